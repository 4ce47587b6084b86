"""Each step's lease by the worker's own clock: a copy whose lease lapsed stops.

When a step's lease lapses (no extension reached the gateway for the lease's length: a
partition, a stalled socket, a gateway that stopped reading us), Inngest gives the step
up and retries it on another worker. Nobody tells the old copy, and Inngest's gateway
keeps the lapsed lease record (only a reply deletes it), so once the old copy is heard
again its extension with the same lease id is *granted*: it would run to its end next to
its retry and reply into the void, the step body twice. (Seen on ``inngest dev``; this
repository's dev gateway drops the lease when it gives a step up, so it refused that
extension and hid the problem.)

So the worker keeps a deadline per running step: when the gateway last confirmed the
lease (the request itself, or an extension's ACK) plus the lease's length, and stops the
step (cancelled, no reply, ``step.lease_expired``) when it passes unconfirmed. The
gateway cannot have given the step up earlier: it checks leases once per extend interval
and then waits a grace period (5 s) for a reply.

The lease's length is not sent; the gateway uses four extend intervals (consts.go:
extend interval = lease / 4), and a lease id is a ULID whose timestamp is its expiry:
the longer of the two is used, so neither a fast local clock nor a gateway with a
different ratio makes a copy stop before its lease really ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import anyio

LEASE_PER_EXTEND_INTERVAL = 4
# Crockford's base 32 (a ULID's alphabet, either case) as the digits int(..., 32) reads,
# every other byte as "!": the time part is decoded in C, once per request and per
# extension ACK (a loop over its characters cost more than the rest of lease_seconds).
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_BASE32 = bytearray(b"!" * 256)
for _i, _char in enumerate(_CROCKFORD):
    _TO_BASE32[ord(_char)] = _TO_BASE32[ord(_char.lower())] = ord(
        "0123456789abcdefghijklmnopqrstuv"[_i])


def ulid_seconds(text: str) -> float | None:
    """The wall-clock time (seconds) a ULID encodes; None if ``text`` is not one."""
    if len(text) != 26:
        return None
    digits = text[:10].encode("ascii", "replace").translate(_TO_BASE32)
    if b"!" in digits:  # not Crockford (I, L, O, U, "_", signs, non-ASCII...)
        return None
    return int(digits, 32) / 1000.0


def lease_seconds(lease_id: str, extend_interval: float) -> float:
    """How long a lease the gateway just granted (or forwarded) lasts from now."""
    by_rule = LEASE_PER_EXTEND_INTERVAL * extend_interval
    expires = ulid_seconds(lease_id)
    if expires is None:
        return by_rule
    return max(by_rule, expires - time.time())


class Leased(Protocol):
    # Read-only members: a step's state may derive them (steps.Step.extending).
    @property
    def lease_deadline(self) -> float: ...  # time.monotonic()

    @property
    def reply(self) -> bytes | None: ...

    @property
    def extending(self) -> bool: ...


S = TypeVar("S", bound=Leased)


async def watch_leases(steps: Callable[[], Iterable[S]], expire: Callable[[S], None],
                       extend_interval: Callable[[], float]) -> None:
    """Forever: ``expire`` each running step whose deadline passed; sleep until the
    earliest deadline, or one extend interval at most (a new step's deadline is four
    away, and the interval is read again after each sleep)."""
    while True:
        now = time.monotonic()
        wake = now + extend_interval()
        due: list[S] = []
        for step in steps():
            if step.reply is not None or not step.extending:
                continue  # finished (its reply is on its way) or already given up
            if step.lease_deadline <= now:
                due.append(step)
            else:
                wake = min(wake, step.lease_deadline)
        for step in due:
            expire(step)
        await anyio.sleep(max(wake - now, 0.01))
