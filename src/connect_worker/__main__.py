"""``python -m connect_worker``: the same CLI as ``connect-worker``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
