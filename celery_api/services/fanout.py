"""Fan-out: a parent run that launches one child per company and closes when they all end.

The parent records how many children it expects before launching any, then lets
its Celery task end without a result (``Ignore``). Each child, as it finishes,
counts its siblings; the one that finds them all finished writes the parent's
summary ``{total_companies, synced, failed, skipped}`` to the record and the
result backend. Counting after each child's own commit means the last to commit
always sees every sibling.

The parent's end is also announced as the Celery event ``task-succeeded`` (its
uuid, the summary, its runtime), because a task ending in ``Ignore`` sends no event:
without it Flower and other ``celery events`` consumers, which build a task's
state from events, would show the parent STARTED forever. A chord would not do:
the parent's own task would end (SUCCESS) as soon as it launched its children, and
waiting in the parent would hold a pool slot its children may need.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from celery.exceptions import Ignore
from celery.utils.saferepr import saferepr

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services import launch as launch_service
from celery_api.services import runstate

log = logging.getLogger("celery_api.fanout")


def fan_out(task, child_type: str, children: list[dict], *, total: int, skipped: int) -> dict:
    """Launch ``children`` (params dicts) under the running ``task``; return or ``Ignore``."""
    parent_id = task.request.id
    if not children:
        return {"total_companies": total, "synced": 0, "failed": 0, "skipped": skipped}
    plan = {"fanout": {"child_type": child_type, "total_companies": total,
                       "expected": len(children), "skipped": skipped}}
    runstate.transition(parent_id, "PROGRESS", meta=plan)
    db.session.commit()
    # The backend's PROGRESS goes first: the last child may close the parent (SUCCESS in
    # the backend) before this task has launched its last child, and must not be undone.
    task.update_state(state="PROGRESS", meta={**plan["fanout"], "launched": len(children)})
    root_id = task.request.root_id or parent_id
    parent = db.session.get(TaskRun, parent_id)
    # Children run like their parent: same queue, priority and tags, and are recorded
    # as launched by the API key that launched it (the history filter finds the tree).
    options = launch_service.LaunchOptions(
        priority=parent.priority if parent else None,
        queue=parent.queue if parent else None,
        tags=list(parent.tags or []) if parent else [])
    for params in children:
        launch_service.launch(
            child_type, params, options,
            lineage=launch_service.Lineage(
                parent_id=parent_id, root_id=root_id,
                launched_by=parent.launched_by if parent else None))
    log.info("📤 %s fanned out %d %s run(s)", parent_id, len(children), child_type)
    raise Ignore()


def finish_if_complete(parent_id: str, celery_app, hostname: str | None = None) -> None:
    """Close the fan-out parent ``parent_id`` if all its children have finished:
    its record, its result backend state, and a ``task-succeeded`` event sent as
    ``hostname`` (the worker closing it; by default this host's name)."""
    parent = db.session.get(TaskRun, parent_id)
    if parent is None or runstate.is_finished(parent.status) or not isinstance(parent.meta, dict):
        return
    plan = parent.meta.get("fanout")
    if not plan:
        return
    counts = dict(db.session.execute(
        sa.select(TaskRun.status, sa.func.count())
        .where(TaskRun.parent_id == parent_id, TaskRun.retry_of.is_(None))
        .group_by(TaskRun.status)
    ).all())
    done = sum(n for status, n in counts.items() if status in runstate.FINISHED)
    if done < plan["expected"]:
        return
    summary = {
        "total_companies": plan["total_companies"],
        "synced": counts.get("SUCCESS", 0),
        "failed": counts.get("FAILURE", 0) + counts.get("REVOKED", 0),
        "skipped": plan["skipped"],
    }
    now = utcnow()
    closed = runstate.finish(parent_id, "SUCCESS", now=now, started_at=parent.started_at,
                             result=summary)
    db.session.commit()
    if closed:
        log.info("✅ %s finished its fan-out: %s", parent_id, summary)
        try:
            celery_app.backend.store_result(parent_id, summary, "SUCCESS")
        finally:  # the event goes out even when the result backend is down
            announce_success(celery_app, parent_id, summary,
                             runstate.runtime(parent.started_at, now), hostname)


def announce_success(celery_app, task_id: str, result, runtime: float | None,
                     hostname: str | None = None) -> None:
    """Send ``task-succeeded`` for ``task_id`` as a worker does at a task's end (the
    result as its repr, the runtime in seconds). Sent whether or not the workers were
    started with ``-E``: a monitor may have switched task events on at run time
    (Flower does), and with no one listening the message is dropped by the broker.
    A failure is logged: the record and the result backend already hold the end."""
    try:
        with celery_app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send("task-succeeded", uuid=task_id,
                            result=saferepr(result, celery_app.Task.resultrepr_maxsize),
                            runtime=runtime or 0.0)
    except Exception as exc:  # noqa: BLE001 - the event is advisory
        log.warning("task-succeeded event of %s not sent: %s", task_id, exc)
