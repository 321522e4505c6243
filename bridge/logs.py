"""Log lines: plain text, or one JSON object per line (``BRIDGE_LOG_FORMAT=json``) with the call's fields.

A call's tasks run in a context that carries its fields (:data:`CALL`: ``call_sid``, ``stream_sid``,
``profile``), so every line logged while serving it, by any module, can say which call it is about;
:class:`CallFields` copies them onto each record. A line may name what happened with
``extra={"event": "…"}``. :class:`JsonFormatter` writes ``time``, ``level``, ``logger``, ``message``, those
fields when present, and ``exception`` with the traceback.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Final

import orjson

CALL: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("bridge_call", default=None)
"""The fields of the call being served in this context (a dict shared by the call's tasks, filled in
as they become known)."""

FIELDS: Final = ("call_sid", "stream_sid", "profile", "event")
FORMATS: Final = ("text", "json")


def call_context(fields: dict[str, str]) -> contextvars.Context:
    """A copy of the current context in which :data:`CALL` is ``fields``: run a call's tasks in it."""
    context = contextvars.copy_context()
    context.run(CALL.set, fields)
    return context


class CallFields(logging.Filter):
    """Puts the current call's fields on every record that passes (without overriding ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = CALL.get()
        if fields:
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value:
                data[name] = str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


def configure(level: str, form: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines (``form``), with the call's fields."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallFields())
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    # websockets logs every handshake at INFO; keep the log about calls.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The Azure SDK logs every request (and the credential every token) at INFO.
    logging.getLogger("azure").setLevel(logging.WARNING)
