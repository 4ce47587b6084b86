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
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


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
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Format seconds the way the gateway does for the values we use ("10s", "1.5s", "500ms")."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        millis = seconds * 1000
        return f"{millis:g}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes == 0:
        return f"{rest:g}s"
    hours, minutes = divmod(int(minutes), 60)
    head = f"{hours}h{minutes}m" if hours else f"{minutes}m"
    return f"{head}{rest:g}s"
