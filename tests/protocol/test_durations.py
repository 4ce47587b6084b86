"""Go ``time.Duration`` strings: what the gateway sends in GATEWAY_CONNECTION_READY.

Accepted and rejected forms follow Go's ``time.ParseDuration`` (``src/time/format.go``).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from connect_worker.protocol.durations import format_go_duration, parse_go_duration

from . import gateway_peer as peer

FAST = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("30s", 30.0),
        ("0s", 0.0),
        ("1m0s", 60.0),
        ("500ms", 0.5),
        ("1h2m3.5s", 3723.5),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("-1s", -1.0),
        ("+5s", 5.0),
        ("2h45m", 9900.0),
        ("300us", 300e-6),
        ("1\u00b5s", 1e-6),  # micro sign, what Go prints
        ("1\u03bcs", 1e-6),  # greek small mu, also accepted by Go
        ("1ns", 1e-9),
        ("1.s", 1.0),  # Go accepts digits before the point only
        (".5s", 0.5),  # ... or after it only
        ("1h1h", 7200.0),  # repeated units add up
        ("1.000000001s", 1.000000001),
        ("4m5.000000006s", 245.000000006),
        ("-1m30s", -90.0),
    ],
)
def test_parse_examples(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",  # missing unit
        "s",  # missing number
        "1x",  # unknown unit
        "1s2",  # trailing number without unit
        " 1s",
        "1s ",
        "1 s",
        "-",
        "+",
        ".",
        ".s",
        "-.s",
        "00",
        "1S",  # units are case-sensitive
        "1sec",
        "1e3s",
        "1hm",
        "--1s",
        "1_000s",
        "0x10s",
        "inf",
        "nan",
        "1h\n",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


@pytest.mark.parametrize(
    "text",
    [
        "\u0661s",  # ARABIC-INDIC DIGIT ONE
        "\uff11s",  # FULLWIDTH DIGIT ONE
        "1\u0660s",  # "1" followed by ARABIC-INDIC DIGIT ZERO
    ],
)
def test_parse_rejects_non_ascii_digits(text: str) -> None:
    # Go only accepts the ASCII digits 0-9; Python's regex \d and float() accept any Nd digit.
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + "s", "9" * 400 + "h", "3000000h"])
def test_parse_rejects_overflow(text: str) -> None:
    # Go's Duration is int64 nanoseconds: anything above 2562047h47m16.854775807s is rejected
    # ("invalid duration"); here an unchecked float would become a huge or infinite interval.
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


@FAST
@given(duration=peer.go_durations())
def test_parse_matches_exact_value(duration: tuple[str, float]) -> None:
    text, seconds = duration
    assert math.isclose(parse_go_duration(text), seconds, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(parse_go_duration("-" + text), -seconds, rel_tol=1e-9, abs_tol=1e-12)


@FAST
@given(text=st.text(max_size=16))
def test_parse_never_raises_anything_but_value_error(text: str) -> None:
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (10, "10s"),
        (30, "30s"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (60, "1m0s"),
        (90, "1m30s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_format_examples(seconds: float, text: str) -> None:
    # The same strings Go's Duration.String() gives for these values.
    assert format_go_duration(seconds) == text


# The values we produce: timer intervals with millisecond resolution, up to a few days.
_MILLIS = st.integers(min_value=0, max_value=5 * 86_400_000).map(lambda ms: ms / 1000)


@FAST
@given(seconds=_MILLIS | st.sampled_from([0.001, 0.01, 0.05, 0.25, 1.0, 2.5, 59.999, 3599.999]))
@example(seconds=0.0)
def test_format_then_parse_round_trips(seconds: float) -> None:
    text = format_go_duration(seconds)
    assert math.isclose(parse_go_duration(text), seconds, rel_tol=1e-9, abs_tol=1e-9), text


@pytest.mark.parametrize("seconds", [1e-8, 2.5e-9, 1e-7, 123e-9])
def test_format_sub_microsecond_values_stay_parseable(seconds: float) -> None:
    # Go would print "10ns", "2ns", "100ns", "123ns"; "%g" gives "1e-05ms", which no parser takes.
    text = format_go_duration(seconds)
    assert math.isclose(parse_go_duration(text), seconds, rel_tol=1e-6, abs_tol=1e-9), text
