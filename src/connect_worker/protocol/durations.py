"""Go ``time.Duration.String()`` parsing.

The gateway sends its intervals as Go duration strings ("10s", "1m0s", "500ms",
"1h2m3.5s"). The official Python client only understands ``<n>s`` and silently
waits forever on anything else (spec W9), so we accept the whole grammar.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_TERM = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
# Go's Duration is int64 nanoseconds: ParseDuration rejects anything longer.
_MAX_SECONDS = (2**63 - 1) / 1e9


def parse_go_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError for anything Go would reject."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"invalid duration {text!r}: empty")
    body = text
    sign = 1.0
    if body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(body):
        match = _TERM.match(body, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 or not total <= _MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def _fraction(value: int, digits: int) -> str:
    whole, frac = divmod(value, 10**digits)
    text = f"{frac:0{digits}d}".rstrip("0")
    return f"{whole}.{text}" if text else str(whole)


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String()`` for ``seconds`` rounded to whole nanoseconds."""
    nanos = round(seconds * 1e9)
    sign, nanos = ("-", -nanos) if nanos < 0 else ("", nanos)
    if nanos == 0:
        return "0s"
    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{_fraction(nanos, 3)}\u00b5s"
    if nanos < 1_000_000_000:
        return f"{sign}{_fraction(nanos, 6)}ms"
    whole_seconds, frac = divmod(nanos, 1_000_000_000)
    minutes, secs = divmod(whole_seconds, 60)
    hours, minutes = divmod(minutes, 60)
    tail = f"{_fraction(secs * 1_000_000_000 + frac, 9)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{tail}"
    if minutes:
        return f"{sign}{minutes}m{tail}"
    return f"{sign}{tail}"
