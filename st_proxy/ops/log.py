"""Logging set-up: one JSON object per line on stdout (or plain text for people at a terminal).

Records carry structured fields through ``extra={...}``; the formatters write them as members (JSON) or ``key=value``
pairs (text). Lifecycle records carry an ``event`` field (start, ready, reload, token_rejected, token_backing_off,
token_recovered, shutdown); the access line is the record of the ``st_proxy.access`` logger, one per request.
Nothing here sees a secret: callers pass ids, codes and sizes only.

The access line is the one record written per request, so it skips ``logging``'s machinery once ``setup`` has run: it
is built straight from its fields (no ``LogRecord``, no ``Formatter``, a timestamp whose date part is formatted once
per second) into ``AccessLog``'s buffer, which is written to the stream in one call per ``FLUSH_SECONDS`` (or sooner,
past ``FLUSH_BYTES``), off the request's path. Nothing is dropped: the buffer is written before any other record, so
the lines stay in order, and on every ``flush()`` of the handler (``logging.shutdown`` at exit, the second-signal
exit in serve.py). A write that fails is reported on stderr once and counted (``AccessLog.failed_lines``), as
``logging`` reports a failed emit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
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
    global _access_log
    if _access_log is not None:
        _access_log.flush()  # what the previous set-up buffered goes to its own stream
    access_log = AccessLog(stream or sys.stdout, fmt)
    handler = _Handler(access_log)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("st_proxy")
    root.handlers[:] = [handler]
    _access_log = access_log
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


FLUSH_SECONDS = 0.05  # how late an access line may reach the stream
FLUSH_BYTES = 64 * 1024  # written at once past this much, whatever the timer says
_ENCODE = json.JSONEncoder(default=str).encode  # json.dumps(default=str) would build an encoder per call
_access_logger = logging.getLogger(ACCESS_LOGGER)
_st_proxy_logger = logging.getLogger("st_proxy")


class _Stamps:
    """``time.time()`` as the formatters write it, with the part that changes once a second formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._utc_head = self._local_head = ""

    def _roll(self, second: int) -> None:
        self._second = second
        self._utc_head = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        self._local_head = datetime.fromtimestamp(second).strftime("%H:%M:%S.")

    def utc(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._roll(second)
        return f"{self._utc_head}{int((now - second) * 1000):03d}Z"

    def local(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._roll(second)
        return f"{self._local_head}{int((now - second) * 1000):03d}"


class AccessLog:
    """The access lines of one ``setup``: formatted at once, written to ``stream`` in batches (module docstring)."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        self.handler: logging.Handler | None = None  # the st_proxy handler writing to the same stream
        self.failed_lines = 0
        self._json = fmt == "json"
        self._pending: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._stamps = _Stamps()

    def line(self, fields: dict[str, object]) -> str:
        now = time.time()
        if self._json:
            return _ENCODE({"time": self._stamps.utc(now), "level": "info", "logger": ACCESS_LOGGER, **fields})
        head = (
            f"{_text_value(fields.pop('method', None))} {_text_value(fields.pop('path', None))} "
            f"{fields.pop('status', '-')} {fields.pop('duration_ms', '-')}ms"
        )
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{self._stamps.local(now)} info    {head}" + (f" {pairs}" if pairs else "")

    def write(self, fields: dict[str, object]) -> None:
        text = self.line(fields) + "\n"
        self._pending.append(text)
        self._size += len(text)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: nothing would run the timer
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        lines, self._pending, self._size = self._pending, [], 0
        lock = self.handler.lock if self.handler is not None else None
        try:
            if lock is not None:
                lock.acquire()
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            finally:
                if lock is not None:
                    lock.release()
        except Exception as exc:  # like logging.Handler.handleError: say so on stderr, never raise into a request
            self.failed_lines += len(lines)
            if self.failed_lines == len(lines):  # the first failure only: a closed stdout would repeat it forever
                print(
                    f"st-proxy: could not write {len(lines)} access log lines ({type(exc).__name__})", file=sys.stderr
                )

    def active(self) -> bool:
        """Whether the proxy's own handler still writes the ``st_proxy`` tree and access lines are enabled."""
        return self.handler in _st_proxy_logger.handlers and _access_logger.isEnabledFor(logging.INFO)


class _Handler(logging.StreamHandler):
    """The ``st_proxy`` handler: writes the buffered access lines before any other record, so the order holds."""

    def __init__(self, access_log: AccessLog) -> None:
        super().__init__(access_log.stream)
        self.access_log = access_log
        access_log.handler = self

    def emit(self, record: logging.LogRecord) -> None:
        self.access_log.flush()
        super().emit(record)

    def flush(self) -> None:
        self.access_log.flush()
        super().flush()


_access_log: AccessLog | None = None


def flush() -> None:
    """Write the buffered access lines now (tests read the stream right after a request)."""
    if _access_log is not None:
        _access_log.flush()


def access(**fields: object) -> None:
    sink = _access_log
    if sink is not None and sink.active():
        sink.write(fields)
    else:  # set up some other way (or not at all): an ordinary record, for whatever handlers exist
        _access_logger.info("request", extra=fields)
