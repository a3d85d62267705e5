"""Logging set-up: one JSON object per line on stdout (or plain text for people at a terminal).

Records carry structured fields through ``extra={...}``; the formatter writes them as JSON members. Nothing here
sees a secret: callers pass ids, codes and sizes only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

ACCESS_LOGGER = "st_proxy.access"
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if record.name != ACCESS_LOGGER:
            line["message"] = record.getMessage()
        line.update(_fields(record))
        if record.exc_info and record.levelno >= logging.ERROR:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = _fields(record)
        if record.name == ACCESS_LOGGER:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
            text = record.getMessage() + (f" ({extra})" if extra else "")
        return f"{stamp} {record.levelname.lower():7} {text}"


def setup(fmt: str = "json", level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("st_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("aiohttp.access").disabled = True  # our own access line replaces aiohttp's


def access(**fields: object) -> None:
    logging.getLogger(ACCESS_LOGGER).info("request", extra=fields)
