"""WSGI entry point: ``app`` for gunicorn, ``celery_app`` for ``celery -A wsgi:celery_app``."""

from celery_api import create_app
from celery_api.settings import ConfigurationError

try:
    app = create_app()
except ConfigurationError as exc:  # a bad setting: its message, not a traceback
    raise SystemExit(f"Error: {exc}") from None
celery_app = app.extensions["celery"]
