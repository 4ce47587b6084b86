"""Structured log events, JSON lines or text, with secrets redacted.

Lifecycle changes are logged with :func:`event`: a stable, greppable event name
as the message plus fields in ``extra``. :func:`configure_logging` installs one
stderr handler: JSON lines (``ts``, ``level``, ``logger``, ``message``,
``event``, the static fields, the context fields, the event's fields) or plain
text, chosen by ``CONNECT_WORKER_LOG_FORMAT`` (``auto`` = JSON unless stderr is
a terminal).

Every line passes a redaction filter first: anything shaped like an Inngest
signing key (``signkey-…``), an API key (``sk-…``, ``sk-ant-…``) or a bearer
token, and every value registered with :func:`register_secret` (the configured
signing keys), is masked in the message, the fields and any traceback, whatever
logger produced the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

REDACTED = "<redacted>"

# Inngest signing keys are "signkey-<env>-<hex>"; the hashed form sent as a bearer
# token keeps the prefix. OpenAI/Anthropic keys are "sk-…" / "sk-ant-…".
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(signkey-[A-Za-z0-9]+-)[A-Za-z0-9]+"), r"\g<1>" + REDACTED),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{12,}"), "sk-" + REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"), r"\g<1>" + REDACTED),
)
_MIN_SECRET_LEN = 6
_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Fields every line carries (deployment_id, replica_id, instance_id) and fields that
# change over the process's life (connection_id); see set_context().
_static: dict[str, Any] = {}
_context: dict[str, Any] = {}

# Set by ops/_otel.py while tracing is on: (fields, event name) -> (trace_id, span_id) of
# the span the line belongs to, or None. Unset, lines carry no trace ids.
TraceLookup = Callable[[Mapping[str, Any], str | None], tuple[str, str] | None]
_trace_lookup: TraceLookup | None = None

_RESERVED = frozenset({"ts", "level", "logger", "message", "event", "exc_type", "exc"})
_HANDLER_MARK = "_connect_worker_handler"


def event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one lifecycle event named ``name`` (e.g. ``drain.start``) with its fields."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"event": name, "fields": fields})


def _signing_key_forms(key: str) -> list[str]:
    """The key, its bare body and the SHA-256 form sent as a bearer token (see gateway_api)."""
    match = re.fullmatch(r"(signkey-[A-Za-z0-9]+-)(.+)", key)
    if match is None:
        return [key]
    prefix, body = match.groups()
    forms = [key, body]
    try:
        digest = hashlib.sha256(bytes.fromhex(body)).hexdigest()
    except ValueError:
        return forms
    return [*forms, digest, prefix + digest]


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear (short values are ignored).

    A signing key is also masked in its hashed form, which is what travels in
    ``Authorization`` headers.
    """
    if value and len(value) >= _MIN_SECRET_LEN:
        with _secrets_lock:
            _secrets.update(f for f in _signing_key_forms(value) if len(f) >= _MIN_SECRET_LEN)


def redact(text: str) -> str:
    """``text`` with registered secrets and key-shaped strings masked."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


def set_context(**fields: Any) -> None:
    """Add fields to every later line (e.g. ``connection_id``); a None value removes one."""
    for key, value in fields.items():
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def set_trace_lookup(lookup: TraceLookup | None) -> None:
    """Lines get ``trace_id`` and ``span_id`` from ``lookup`` (None: no trace ids)."""
    global _trace_lookup
    _trace_lookup = lookup


class RedactingFilter(logging.Filter):
    """Render the message, then mask secrets in it, in the fields and in the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_connect_worker_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = {str(k): _redact_value(v) for k, v in fields.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._connect_worker_redacted = True
        return True


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _line_fields(record: logging.LogRecord) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for source in (_static, _context, getattr(record, "fields", None) or {}):
        for key, value in source.items():
            name = f"{key}_" if key in _RESERVED else key
            merged[name] = _redact_value(value)
    if _trace_lookup is not None:
        name = getattr(record, "event", None)
        ids = _trace_lookup(merged, name if isinstance(name, str) else None)
        if ids is not None:
            merged["trace_id"], merged["span_id"] = ids
    return merged


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        name = getattr(record, "event", None)
        if isinstance(name, str):
            line["event"] = name
        line.update(_line_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            if record.exc_info and record.exc_info[0] is not None:
                line["exc_type"] = record.exc_info[0].__name__
            line["exc"] = redact(record.exc_text)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts level logger message key=value …`` for humans at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record.created),
            f"{record.levelname:<7}",
            record.name,
            redact(record.getMessage()),
        ]
        parts.extend(
            f"{key}={_text_value(value)}" for key, value in _line_fields(record).items()
        )
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + redact(record.exc_text)
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c.isspace() or c in "\"=" for c in text):
        return json.dumps(text)
    return text


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` → ``json`` unless ``stream`` is a terminal, then ``text``."""
    fmt = fmt.lower()
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return "text" if callable(isatty) and isatty() else "json"
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r}: expected auto, json or text")
    return fmt


def configure_logging(
    fmt: str,
    level: str,
    static_fields: Mapping[str, Any],
    *,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the one connect_worker handler on the root logger (replacing an earlier one).

    ``static_fields`` (deployment_id, replica_id, instance_id) go on every line; None
    values are left out. ``secrets`` are masked wherever they would appear.
    """
    stream = sys.stderr if stream is None else stream
    for secret in secrets:
        register_secret(secret)
    _static.clear()
    _static.update({k: v for k, v in static_fields.items() if v is not None})
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JSONFormatter() if resolve_format(fmt, stream) == "json"
                         else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Request-per-line chatter from HTTP clients is noise next to lifecycle events.
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
