"""Example: the three LLM report functions of the original application on connect_worker.

The code ships inside the package as ``connect_worker.lab.apps.reports`` (so the demo
works from an installed wheel); this name keeps ``connect-worker run examples.reports``
and ``python -m examples.reports`` working in a checkout.
"""

from connect_worker.lab.apps.reports import client, functions, llm

__all__ = ["client", "functions", "llm"]
