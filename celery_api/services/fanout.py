"""Fan-out: a parent run that launches one child per company and closes when they all end.

The parent records how many children it expects before launching any, then lets
its Celery task end without a result (``Ignore``). Each child, as it finishes,
counts its siblings; the one that finds them all finished writes the parent's
summary ``{total_companies, synced, failed, skipped}`` to the record and the
result backend. Counting after each child's own commit means the last to commit
always sees every sibling.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from celery.exceptions import Ignore

from celery_api.extensions import db
from celery_api.models import TaskRun
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
    task.update_state(state="PROGRESS", meta={**plan["fanout"], "launched": len(children)})
    log.info("📤 %s fanned out %d %s run(s)", parent_id, len(children), child_type)
    raise Ignore()


def finish_if_complete(parent_id: str, celery_app) -> None:
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
    closed = runstate.finish(parent_id, "SUCCESS", started_at=parent.started_at,
                             result=summary)
    db.session.commit()
    if closed:
        celery_app.backend.store_result(parent_id, summary, "SUCCESS")
        log.info("✅ %s finished its fan-out: %s", parent_id, summary)
