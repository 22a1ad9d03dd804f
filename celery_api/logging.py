"""Logging, configured once at start-up (API, worker and beat alike).

``LOG_FORMAT=text`` keeps the original module's emoji markers (📤 launch, 📊 status,
✅ success, ❌ error, 🚫 cancellation); ``LOG_FORMAT=json`` prints one JSON object
per line. Everything goes to stderr, one line per event.
"""

from __future__ import annotations

import logging
import sys

_configured = False

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str = "INFO", fmt: str = "text", *, force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"LOG_FORMAT must be 'text' or 'json', got {fmt!r}")
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    _configured = True
