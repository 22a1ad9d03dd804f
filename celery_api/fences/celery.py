"""Celery internals this service relies on (tests/test_fences.py checks each one).

- ``celery._state._set_task_join_will_block(True)``: what Celery's prefork workers
  call so the Redis result backend skips its per-publish SUBSCRIBE; nothing in this
  service waits on a result with ``.get()``.
- ``app.amqp.as_task_v2(...)`` and ``app.amqp.send_task_message(producer, name,
  message, ...)``: Celery's own protocol-2 message, built and sent without
  ``send_task``'s per-call routing, result object and argument repr.
- ``celery.worker.state.revoked``: the worker's set of revoked ids (kept in its state
  file); a worker coming up adds the runs revoked while it was away.
- ``KeyValueStoreBackend.mget``, ``get_key_for_task`` and ``decode_result``: many runs'
  stored states in one MGET.
"""

from __future__ import annotations

from celery._state import _set_task_join_will_block
from celery.backends.base import KeyValueStoreBackend
from celery.worker import state as worker_state


def no_result_waits() -> None:
    """Tell Celery nothing in this process joins on a result (as prefork workers do)."""
    _set_task_join_will_block(True)


def task_message(app, task_id: str, name: str, *, kwargs: dict, countdown, eta, expires,
                 root_id, parent_id, origin: str, kwargsrepr: str):
    """Celery's protocol-2 message for one task call (``app.amqp.as_task_v2``)."""
    return app.amqp.as_task_v2(
        task_id, name, kwargs=kwargs, countdown=countdown, eta=eta, expires=expires,
        root_id=root_id, parent_id=parent_id, origin=origin, argsrepr="()",
        kwargsrepr=kwargsrepr)


def send_task_message(app, producer, name: str, message, **options) -> None:
    """Publish a message built by :func:`task_message` (``app.amqp.send_task_message``)."""
    app.amqp.send_task_message(producer, name, message, **options)


def remember_revoked(task_ids) -> None:
    """Add ids to this worker's revoked set: Celery discards their messages on receipt."""
    for task_id in task_ids:
        worker_state.revoked.add(task_id)


def backend_metas(backend, task_ids: list[str]) -> dict[str, dict]:
    """The stored state of many runs: one MGET on a key-value backend (Redis), else one
    read per id. Runs the backend knows nothing of are left out."""
    if not task_ids:
        return {}
    if isinstance(backend, KeyValueStoreBackend):
        values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        return {task_id: backend.decode_result(value)
                for task_id, value in zip(task_ids, values, strict=True) if value}
    return {task_id: backend.get_task_meta(task_id) for task_id in task_ids}
