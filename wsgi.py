"""WSGI entry point: ``app`` for gunicorn, ``celery_app`` for ``celery -A wsgi:celery_app``."""

from celery_api import create_app

app = create_app()
celery_app = app.extensions["celery"]
