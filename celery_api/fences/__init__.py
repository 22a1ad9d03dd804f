"""Code that reaches below a library's public API, fenced: one module per library.

- ``fences/celery.py``: Celery (message building and sending below ``send_task``, the
  worker's revoked set, the result backend's MGET, the join-will-block flag).
- ``fences/kombu.py``: kombu (Redis client reuse, library-error wrapping, reading the
  Redis queues and unacknowledged messages).
- ``fences/gunicorn.py``: gunicorn's gthread worker (``EdgeThreadWorker``: request heads
  read in the event loop; requests parked with the waiting hub, written by neither the
  thread nor the worker).
- ``celery_api/smorest.py``: flask-smorest and webargs (the ``Api``, ``Blueprint`` and
  parser subclasses override their private hooks: spec set-up, responses, the JSON
  document, error handlers, raw JSON loading).

Each states what it relies on, applies only where that holds, and is checked by
tests/test_fences.py, which fails loudly when an upgrade changes it. The lock files pin
the versions these checks passed with.
"""
