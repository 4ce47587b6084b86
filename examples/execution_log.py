"""``connect_worker.lab.apps.execution_log`` under its checkout name."""

from connect_worker.lab.apps.execution_log import record

__all__ = ["record"]
