"""Example: the three LLM report functions of the original application on connect_worker.

``client`` and ``functions`` are what ``connect-worker run connect_worker.lab.apps.reports``
(``examples.reports`` in a checkout) serves; ``python -m connect_worker.lab.apps.reports``
runs one report offline without a worker.
"""

from __future__ import annotations

from .app import client, functions, llm

__all__ = ["client", "functions", "llm"]
