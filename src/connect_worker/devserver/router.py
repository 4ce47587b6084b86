"""Pick a worker connection for a request (routing/router.go: getSuitableConnection,
isHealthy, pickConnection — restated).

A connection qualifies if it is READY (status and phase), serves the app, its
worker group for that app lists the function slug, its last heartbeat is fresh,
and its instance has spare capacity. Among those, one is drawn at random with
weights rising linearly from 1 (oldest worker group) to 10 (newest).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .leases import LeaseStore
from .state import ConnectionInfo, ConnStatus, DevState, Phase


@dataclass(frozen=True)
class RouteResult:
    conn_id: str | None
    # None on success, else a syscode: connect_no_healthy_connection,
    # connect_all_workers_at_capacity.
    error: str | None = None
    any_draining: bool = False


class Router:
    def __init__(self, state: DevState, leases: LeaseStore, seed: int | None) -> None:
        self._state = state
        self._leases = leases
        self._rng = random.Random(seed)

    def _healthy(self, conn: ConnectionInfo, app: str, slug: str, now: float) -> bool:
        return (
            conn.status is ConnStatus.READY
            and conn.phase is Phase.READY
            and slug in conn.functions.get(app, ())
            and now - conn.last_heartbeat <= self._state.config.heartbeat_stale
        )

    def route(self, app: str, slug: str, exclude: frozenset[str] = frozenset()) -> RouteResult:
        now = time.monotonic()
        conns = [c for c in self._state.connections.values() if app in c.functions]
        healthy = [
            c for c in conns if c.conn_id not in exclude and self._healthy(c, app, slug, now)
        ]
        any_draining = any(c.status is ConnStatus.DRAINING for c in conns)
        if not healthy:
            return RouteResult(None, "connect_no_healthy_connection", any_draining)
        candidates = [c for c in healthy if self._leases.has_capacity(c.instance_id)]
        if not candidates:
            return RouteResult(None, "connect_all_workers_at_capacity", any_draining)
        override = self._state.faults.route
        if override is not None:
            chosen = override([c.conn_id for c in candidates])
            if chosen is not None and any(c.conn_id == chosen for c in candidates):
                return RouteResult(chosen)
        return RouteResult(self._pick(candidates, app).conn_id)

    def _pick(self, candidates: list[ConnectionInfo], app: str) -> ConnectionInfo:
        if len(candidates) == 1:
            return candidates[0]
        ages = [self._state.groups.get(c.group_hashes.get(app, ""), 0.0) for c in candidates]
        oldest, newest = min(ages), max(ages)
        if newest == oldest:
            weights = [1.0] * len(candidates)
        else:
            weights = [1.0 + 9.0 * (a - oldest) / (newest - oldest) for a in ages]
        return self._rng.choices(candidates, weights=weights, k=1)[0]
