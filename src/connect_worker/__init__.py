"""connect_worker: host Inngest functions over Inngest Connect, and drain safely on deploys."""

from __future__ import annotations

__version__ = "0.1.0"
