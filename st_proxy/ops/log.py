"""Logging set-up: one JSON object per line on stdout (or plain text for people at a terminal).

Records carry structured fields through ``extra={...}``; the formatters write them as members (JSON) or ``key=value``
pairs (text). Lifecycle records carry an ``event`` field (start, ready, reload, token_rejected, token_backing_off,
token_recovered, shutdown); the access line is the record of the ``st_proxy.access`` logger, one per request.
Nothing here sees a secret: callers pass ids, codes and sizes only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

ACCESS_LOGGER = "st_proxy.access"
LIBRARY_LOGGERS = ("aiohttp.server", "aiohttp.web", "asyncio")
FORMATS = ("json", "text")
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Text mode quotes a value with spaces, quotes, '=' or control characters, so a crafted path cannot forge a line.
_NEEDS_QUOTES = re.compile(r'[\s"=\x00-\x1f\x7f]')


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if record.name != ACCESS_LOGGER:
            line["message"] = record.getMessage()
        for key, value in _fields(record).items():
            line.setdefault(key, value)  # a field never overwrites time, level, logger or message
        if record.exc_info and record.levelno >= logging.ERROR:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if _NEEDS_QUOTES.search(text) or not text else text


class TextFormatter(logging.Formatter):
    """``12:00:01.234 info    GET /crm/v2/tenant/42/customers 200 12.3ms tenant=42 request_id=... bytes=512``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = _fields(record)
        if record.name == ACCESS_LOGGER:
            head = (
                f"{_text_value(fields.pop('method', None))} {_text_value(fields.pop('path', None))} "
                f"{fields.pop('status', '-')} {fields.pop('duration_ms', '-')}ms"
            )
        else:
            head = record.getMessage()
            fields.pop("event", None)  # the message already says what happened
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        text = f"{stamp} {record.levelname.lower():7} {head}" + (f" {pairs}" if pairs else "")
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _RefusedRequests(logging.Filter):
    """aiohttp logs a request its HTTP parser refused (a malformed request line or header: nothing reached the proxy)
    as an ERROR with a traceback whose text quotes the offending bytes, which could be a header value. One warning
    line naming the error class says the same without either."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self._threshold = threshold  # --log-level error must still hide the downgraded line

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "refused a malformed request from %s (%s)", (peer, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.event, record.error, record.status = "bad_request", type(exc).__name__, exc.code
        return record.levelno >= self._threshold


def setup(fmt: str = "json", level: str = "info", stream: TextIO | None = None, *, libraries: bool = False) -> None:
    """Send the proxy's records (the ``st_proxy`` logger tree) to ``stream``, stdout by default.

    ``libraries`` (the CLI sets it) also routes aiohttp's and asyncio's warnings and errors there, in the same format,
    so stdout stays the one place to read and stderr gets no tracebacks for malformed requests.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("st_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("aiohttp.access").disabled = True  # our own access line replaces aiohttp's
    if libraries:
        for name in LIBRARY_LOGGERS:
            library = logging.getLogger(name)
            library.handlers[:] = [handler]
            library.setLevel(max(logging.WARNING, root.level))
            library.propagate = False
            library.filters[:] = [f for f in library.filters if not isinstance(f, _RefusedRequests)]
            library.addFilter(_RefusedRequests(root.level))


def access(**fields: object) -> None:
    logging.getLogger(ACCESS_LOGGER).info("request", extra=fields)
