"""The one line a worker with no gateway says: what it tried and what to start.

The supervisor retries forever (a gateway restart must not kill the fleet), and each try
logs ``connection.retry``. For a newcomer whose gateway is simply not running, that is a
stream of ``ConnectError``s with no hint. After a few consecutive network failures this
says once, at error level, which URL was tried and what would answer it; it says it
again only after a connection has succeeded and been lost again.
"""

from __future__ import annotations

import logging

from ..config import Config
from ..errors import TransportError
from ..ops.logs import event

log = logging.getLogger("connect_worker.engine.worker")

# Consecutive failed tries before the hint: a gateway restart is usually over by then.
TRIES = 3


class UnreachableHint:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._failures = 0
        self._said = False

    def failed(self, exc: Exception) -> None:
        """A try to start or open a connection failed with ``exc``."""
        if not isinstance(exc, TransportError):
            self._failures = 0  # the gateway answered: it is there
            return
        self._failures += 1
        if self._failures == TRIES and not self._said:
            self._said = True
            event(log, "connection.unreachable", level=logging.ERROR, tries=TRIES,
                  api=self._config.api_base_url, error=str(exc), hint=self.hint())

    def connected(self) -> None:
        self._failures = 0
        self._said = False

    def hint(self) -> str:
        api = self._config.api_base_url
        if self._config.dev:
            return (f"no gateway answers at {api}: start one with `connect-worker dev` "
                    "(or Inngest's `inngest dev`), or point INNGEST_DEV / "
                    "INNGEST_API_BASE_URL at the one that runs; still retrying")
        return (f"Inngest's API at {api} is unreachable from here: check the network and "
                "INNGEST_API_BASE_URL (for a local gateway set INNGEST_DEV=1 and start "
                "`connect-worker dev`); still retrying")
