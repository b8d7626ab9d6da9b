"""Structured logs: one JSON object a line (when configured), carrying the request id.

The request id travels in a context variable, so every log record emitted while a request is being
handled (by the HTTP layer or the worker thread running its generation) carries it without being
passed around:

    from kleinserve.service.logging import configure_logging, request_context

    configure_logging(fmt="json", level="INFO")       # once, at startup (`kleinserve serve --log-format json`)
    with request_context(request_id):                  # in the HTTP middleware / the worker, per job
        log.info("job started", extra={"endpoint_id": ..., "steps": 28})

A line looks like
    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "kleinserve.service.worker",
     "msg": "job started", "request_id": "3f2c...", "endpoint_id": "fal-ai/flux-2/klein/9b/base"}

Keys given through `extra=` become top-level fields. `fmt="text"` keeps a readable single line with
the request id in brackets. Only the `kleinserve` logger tree (and uvicorn's, when asked) is
configured; nothing else in the process is touched.

Upload URLs carry their bearer token in the query string (`?token=...`): `install_access_log_redaction`
(called by create_app) puts a filter on uvicorn's access logger that writes `token=REDACTED` instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, Optional

request_id_var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "kleinserve_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "request_id", "taskName"}


@contextlib.contextmanager
def request_context(request_id: Optional[str]) -> Iterator[None]:
    """Every log record inside the block carries `request_id`."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on each record (`record.request_id`, None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") or record.request_id is None:
            record.request_id = request_id_var.get()
        return True



_TOKEN_PARAM = re.compile(r"([?&]token=)[^&#\s\"']*")


def redact_tokens(text: str) -> str:
    """`/storage/upload/x?token=abc&y=1` -> `/storage/upload/x?token=REDACTED&y=1`."""
    return _TOKEN_PARAM.sub(r"\1REDACTED", text)


class RedactTokensFilter(logging.Filter):
    """Redacts `token=` query parameters in a record's message and string arguments (uvicorn's
    access lines pass the path with its query string as an argument; the tuple keeps its shape)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "token=" in a for a in record.args):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_access_log_redaction(logger_name: str = "uvicorn.access") -> None:
    """Adds a `RedactTokensFilter` to uvicorn's access logger (once; uvicorn's log config keeps it)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactTokensFilter) for f in logger.filters):
        logger.addFilter(RedactTokensFilter())

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extra fields, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is None:
            rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,123 INFO kleinserve.x [request-id] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: CR/LF inside a message (client text that slipped into it) are
        # escaped so nobody can forge a log line; tracebacks are appended after this, unchanged.
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)


def configure_logging(
    fmt: Optional[str] = None,
    level: Optional[str | int] = None,
    *,
    stream: Any = None,
    include_uvicorn: bool = True,
) -> logging.Handler:
    """Configure the `kleinserve` logger tree (and uvicorn's): `fmt` is "json" or "text".

    Defaults come from `KLEINSERVE_LOG_FORMAT` (text) and `KLEINSERVE_LOG_LEVEL` (INFO). Calling it
    again replaces the handler it installed before. Returns the handler.
    """
    fmt = (fmt or os.environ.get("KLEINSERVE_LOG_FORMAT") or "text").lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    level = level or os.environ.get("KLEINSERVE_LOG_LEVEL") or "INFO"
    if isinstance(level, str):
        level = level.upper()

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler._kleinserve = True  # type: ignore[attr-defined]

    names = ["kleinserve"]
    if include_uvicorn:
        names += ["uvicorn", "uvicorn.error", "uvicorn.access"]
    for name in names:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, "_kleinserve", False) or (name.startswith("uvicorn") and include_uvicorn):
                logger.removeHandler(old)
        if name in ("kleinserve", "uvicorn"):
            logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = False
        else:
            logger.propagate = True  # uvicorn.error / uvicorn.access reach the "uvicorn" handler
    return handler


def uvicorn_log_config(fmt: Optional[str] = None, level: Optional[str] = None) -> dict:
    """A `log_config` for `uvicorn.run` that routes uvicorn's logs through our formatter."""
    fmt = (fmt or os.environ.get("KLEINSERVE_LOG_FORMAT") or "text").lower()
    level = (level or os.environ.get("KLEINSERVE_LOG_LEVEL") or "INFO").upper()
    formatter = "kleinserve.service.logging.JsonFormatter" if fmt == "json" \
        else "kleinserve.service.logging.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "kleinserve.service.logging.RequestIdFilter"}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "filters": ["request_id"], "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": level},
            "kleinserve": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)
