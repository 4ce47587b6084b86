"""Request leases, per-instance capacity and the reply buffer (state/request.go,
lua/extend_lease.lua, gateway_msg_reply.go, restated).

Times are ``time.monotonic()`` seconds; lease IDs are ULIDs whose timestamp is
the (wall-clock) expiry, like the real ones.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..protocol import pb
from .ulid import new_ulid


@dataclass
class Lease:
    request_id: str
    lease_id: str
    expires_at: float
    previous_lease_id: str | None = None
    instance_id: str | None = None  # the instance the request was assigned to
    # The instance whose extension minted the current lease ID: the only one that may
    # present the previous ID again (it lost that extension's ACK). Routing does not
    # make an instance the holder: after a re-route race two workers hold the same
    # lease ID, and the first to extend it keeps the lease.
    extended_by: str | None = None
    # When the proxy gave up on the request without a reply (the record stays a while).
    abandoned_at: float | None = None

    def live(self, now: float) -> bool:
        return now < self.expires_at


# How long the record of a request the proxy gave up on is kept (the real key's expiry
# is the 2 h request maximum plus one lease; an hour bounds a long soak's memory).
ABANDONED_TTL = 3600.0


class LeaseError(Exception):
    """The request is already leased."""


class LeaseStore:
    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.leases: dict[str, Lease] = {}
        # instance_id -> max concurrency (None/0 = unlimited)
        self.capacity: dict[str, int | None] = {}
        # Wakes the proxy waiting on a request when its lease changes by force.
        self.pokes: dict[str, asyncio.Event] = {}

    def _mint(self, now: float) -> tuple[str, float]:
        expires = now + self.duration
        return new_ulid(time.time() + self.duration), expires

    def lease(self, request_id: str) -> Lease:
        now = time.monotonic()
        current = self.leases.get(request_id)
        if current is not None and current.live(now):
            raise LeaseError(f"request {request_id} already leased")
        lease_id, expires = self._mint(now)
        lease = Lease(request_id, lease_id, expires)
        self.leases[request_id] = lease
        return lease

    def restart(self, request_id: str) -> None:
        """The lease's full length from now, same ID (its request waited for a route)."""
        lease = self.leases.get(request_id)
        if lease is not None:
            lease.expires_at = time.monotonic() + self.duration

    def release(self, request_id: str) -> None:
        """The proxy consumed the request's reply: the lease record goes (DeleteLease)."""
        self.leases.pop(request_id, None)
        self.pokes.pop(request_id, None)

    def give_up(self, request_id: str) -> None:
        """The proxy gave up on the request without a reply (lease lapsed, forward failed).

        Like the real proxy, the lease record stays (the real key lives for the 2 h
        request maximum): only the request -> instance mapping of capacity tracking goes
        (cleanupWorkerRequest). So a worker that comes back and extends with its current
        lease ID renews the lease of a request nobody waits for any more, unless its
        capacity is limited (then the mapping check refuses it), see ``extend``."""
        self.pokes.pop(request_id, None)
        lease = self.leases.get(request_id)
        if lease is not None:
            lease.instance_id = None
            lease.abandoned_at = time.monotonic()
        self._prune()

    def _prune(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, lease in self.leases.items()
                           if lease.abandoned_at is not None
                           and now - lease.abandoned_at > ABANDONED_TTL]:
            del self.leases[request_id]

    def is_live(self, request_id: str) -> bool:
        lease = self.leases.get(request_id)
        return lease is not None and lease.live(time.monotonic())

    def expire(self, request_id: str) -> bool:
        """Force a lease to lapse now (fault injection); wake its proxy."""
        lease = self.leases.get(request_id)
        if lease is None:
            return False
        lease.expires_at = time.monotonic()
        poke = self.pokes.get(request_id)
        if poke is not None:
            poke.set()
        return True

    def extend(self, request_id: str, lease_id: str, instance_id: str) -> str | None:
        """Return the new lease ID, or None for a NACK (extend_lease.lua, spec §5.2)."""
        lease = self.leases.get(request_id)
        if lease is None:
            return None  # -1: no lease record (the reply was consumed)
        now = time.monotonic()
        limited = bool(self.capacity.get(instance_id))
        if limited and lease.instance_id != instance_id:
            return None  # -3: not mapped to this instance (or the proxy gave up)
        if lease.lease_id != lease_id and lease.live(now):
            # One lost EXTEND_LEASE_ACK: the previous ID from the instance that
            # extended it gets the current ID back instead of a NACK (v1.41.0+).
            if lease_id == lease.previous_lease_id and lease.extended_by == instance_id:
                return lease.lease_id
            return None  # -2: someone else holds a live lease
        # The current lease ID, or any ID once the current lease lapsed: extend, even
        # after the proxy gave up on the request (the lua script does not know).
        new_id, expires = self._mint(now)
        lease.previous_lease_id = lease.lease_id
        lease.lease_id = new_id
        lease.expires_at = expires
        lease.extended_by = instance_id
        return new_id

    # -- capacity ------------------------------------------------------------

    def set_capacity(self, instance_id: str, limit: int | None) -> None:
        self.capacity[instance_id] = limit or None

    def active(self, instance_id: str) -> int:
        now = time.monotonic()
        return sum(
            1
            for lease in self.leases.values()
            if lease.instance_id == instance_id and lease.live(now)
        )

    def has_capacity(self, instance_id: str) -> bool:
        limit = self.capacity.get(instance_id)
        return not limit or self.active(instance_id) < limit

    def assign(self, request_id: str, instance_id: str | None) -> None:
        lease = self.leases.get(request_id)
        if lease is not None:
            lease.instance_id = instance_id


@dataclass
class _Buffered:
    response: pb.SDKResponse
    expires_at: float


@dataclass
class ReplyBuffer:
    """``{env}:buffered-response:{request_id}``: SET NX with a TTL, plus a direct
    notification to the proxy waiting for that request (the gRPC fast path)."""

    ttl: float
    _items: dict[str, _Buffered] = field(default_factory=dict)
    _waiters: dict[str, asyncio.Future[pb.SDKResponse]] = field(default_factory=dict)

    def save(self, response: pb.SDKResponse) -> bool:
        """Store if absent; True if stored (False for a duplicate)."""
        now = time.monotonic()
        existing = self._items.get(response.request_id)
        if existing is not None and existing.expires_at > now:
            return False
        self._items[response.request_id] = _Buffered(response, now + self.ttl)
        waiter = self._waiters.get(response.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        return True

    def get(self, request_id: str) -> pb.SDKResponse | None:
        item = self._items.get(request_id)
        if item is None:
            return None
        if item.expires_at <= time.monotonic():
            del self._items[request_id]
            return None
        return item.response

    def delete(self, request_id: str) -> None:
        self._items.pop(request_id, None)

    def waiter(self, request_id: str) -> asyncio.Future[pb.SDKResponse]:
        fut: asyncio.Future[pb.SDKResponse] = asyncio.get_running_loop().create_future()
        existing = self.get(request_id)
        if existing is not None:
            fut.set_result(existing)
        self._waiters[request_id] = fut
        return fut

    def forget_waiter(self, request_id: str) -> None:
        fut = self._waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
