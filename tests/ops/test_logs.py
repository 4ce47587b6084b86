"""JSON lines (and text) carry the event name, the fields and the static fields."""

from __future__ import annotations

import io
import json
import logging

import pytest

from connect_worker.ops import logs
from connect_worker.ops.logs import configure_logging, event, resolve_format, set_context

STATIC = {"deployment_id": "dep-42", "replica_id": "rep-7", "instance_id": "worker-rep-7-1"}


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture(autouse=True)
def _no_context() -> None:
    logs._context.clear()


def test_json_lines_carry_event_fields_and_static_fields(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", STATIC, stream=log_stream)
    log = logging.getLogger("connect_worker.drain")
    set_context(connection_id="01JCONN")
    event(log, "drain.start", in_flight=2, budget_seconds=55.0)
    log.info("plain %s message", "formatted")
    set_context(connection_id=None)
    event(log, "drain.end", level=logging.WARNING, abandoned=0)
    first, second, third = _lines(log_stream)
    assert first["event"] == first["message"] == "drain.start"
    assert first["logger"] == "connect_worker.drain"
    assert first["level"] == "info"
    assert (first["in_flight"], first["budget_seconds"]) == (2, 55.0)
    assert first["connection_id"] == "01JCONN"
    for key, value in STATIC.items():
        assert first[key] == second[key] == third[key] == value
    assert str(first["ts"]).endswith("Z") and "T" in str(first["ts"])
    assert second["message"] == "plain formatted message" and "event" not in second
    assert third["level"] == "warning" and "connection_id" not in third


def test_fields_cannot_overwrite_the_line_structure(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", STATIC, stream=log_stream)
    event(logging.getLogger("x"), "reconnect", level=logging.INFO, message="m", ts=1,
          reason="gateway_closing")
    (line,) = _lines(log_stream)
    assert line["event"] == "reconnect" and line["message"] == "reconnect"
    assert line["message_"] == "m" and line["ts_"] == 1


def test_exceptions_are_one_json_line(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", {}, stream=log_stream)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("x").exception("step failed")
    (line,) = _lines(log_stream)
    assert line["exc_type"] == "ValueError"
    assert "bad thing" in str(line["exc"])


def test_level_filters_and_reconfiguring_replaces_the_handler(log_stream: io.StringIO) -> None:
    configure_logging("json", "warning", {}, stream=log_stream)
    configure_logging("json", "warning", {}, stream=log_stream)
    log = logging.getLogger("y")
    log.info("hidden")
    log.warning("shown")
    assert [line["message"] for line in _lines(log_stream)] == ["shown"]


def test_text_format_is_readable(log_stream: io.StringIO) -> None:
    configure_logging("text", "info", STATIC, stream=log_stream)
    event(logging.getLogger("connect_worker.engine.session"), "connection.ready",
          connection_id="01J", note="two words")
    (line,) = log_stream.getvalue().splitlines()
    assert " INFO " in line and "connect_worker.engine.session connection.ready" in line
    assert "deployment_id=dep-42" in line and 'note="two words"' in line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_json_off_a_terminal_and_text_on_one() -> None:
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", _Tty()) == "text"
    assert resolve_format("TEXT", io.StringIO()) == "text"
    with pytest.raises(ValueError):
        resolve_format("xml", io.StringIO())
