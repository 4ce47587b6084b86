"""A tiny ULID generator (https://github.com/ulid/spec): 48-bit millisecond
timestamp + 80 random bits, Crockford base32, 26 characters.

The real gateway only checks that connection and lease IDs *parse* as ULIDs,
and encodes a lease's expiry in its lease ID's timestamp; we do the same.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_DECODE.update({c.lower(): i for c, i in list(_DECODE.items())})
for _alias, _target in (("O", "0"), ("o", "0"), ("I", "1"), ("i", "1"), ("L", "1"), ("l", "1")):
    _DECODE[_alias] = _DECODE[_target]

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_ulid(at: float | None = None) -> str:
    """A new ULID for wall-clock time ``at`` (seconds; default now).

    IDs minted in the same millisecond without an explicit time are monotonic.
    """
    global _last_ms, _last_rand
    ms = int((time.time() if at is None else at) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    if at is None:
        with _lock:
            if ms == _last_ms:
                rand = (_last_rand + 1) & ((1 << 80) - 1)
            _last_ms, _last_rand = ms, rand
    return _encode((ms << 80) | rand)


def is_ulid(text: str) -> bool:
    """True if ``text`` parses as a ULID (26 base32 chars, first char <= '7')."""
    if len(text) != 26:
        return False
    if any(c not in _DECODE for c in text):
        return False
    return _DECODE[text[0]] <= 7


def ulid_time(text: str) -> float:
    """The wall-clock time (seconds) encoded in a ULID; ValueError if it is not one."""
    if not is_ulid(text):
        raise ValueError(f"not a ULID: {text!r}")
    ms = 0
    for c in text[:10]:
        ms = (ms << 5) | _DECODE[c]
    return ms / 1000.0
