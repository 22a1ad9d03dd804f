"""Logging, configured once at start-up (API, worker and beat alike).

``LOG_FORMAT=text`` keeps the original module's emoji markers (📤 launch, 📊 status,
✅ success, ❌ error, 🚫 cancellation); ``LOG_FORMAT=json`` prints one JSON object
per line. Everything goes to stderr, one line per event, with the request id of the
HTTP request being served or of the one that launched the task being run.
"""

from __future__ import annotations

import logging
import sys

_configured = False

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s"


def current_request_id() -> str | None:
    """The id of the HTTP request being served, or of the one that launched this task."""
    from flask import g, has_request_context

    if has_request_context():
        return g.get("request_id")
    from celery import current_task

    if current_task and not current_task.request.called_directly:
        return getattr(current_task.request, "request_id", None)
    return None


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record ("-" outside a request or a task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            try:
                record.request_id = current_request_id() or "-"
            except Exception:  # noqa: BLE001 - logging must never fail
                record.request_id = "-"
        return True


def configure_logging(level: str = "INFO", fmt: str = "text", *, force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(request_id)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"LOG_FORMAT must be 'text' or 'json', got {fmt!r}")
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    _configured = True
