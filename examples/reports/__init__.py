"""Example: the three LLM report functions of the original application on connect_worker.

``client`` and ``functions`` are what ``connect-worker run examples.reports`` serves;
``python -m examples.reports`` runs one report offline without a worker.
"""

from __future__ import annotations

from .app import client, functions, llm

__all__ = ["client", "functions", "llm"]
