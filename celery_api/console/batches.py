"""Batches: the recent ones, and one batch's progress by status."""

from __future__ import annotations

import sqlalchemy as sa
from flask import redirect, render_template, url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.console import blp, console_page
from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.resources.fields import parse_uuid
from celery_api.services import batches, database

RECENT = 50
# The order the status bar shows them in: done first, then running, then waiting.
ORDER = ("SUCCESS", "FAILURE", "REVOKED", "PROGRESS", "STARTED", "RETRY", "RECEIVED",
         "PENDING")


def recent_batches(limit: int = RECENT) -> list:
    """The newest batches: one grouped read of the batched runs (the sparse batch_id
    index holds only them), newest first."""
    with database.unavailable_as():
        return db.session.execute(
            sa.select(TaskRun.batch_id, sa.func.count().label("total"),
                      sa.func.min(TaskRun.created_at).label("created_at"))
            .where(TaskRun.batch_id.is_not(None)).group_by(TaskRun.batch_id)
            .order_by(sa.desc("created_at")).limit(limit)).all()


def status_bar(counts: dict, total: int) -> list[tuple[str, int, float]]:
    ordered = [s for s in ORDER if s in counts] + sorted(set(counts) - set(ORDER))
    return [(s, counts[s], 100.0 * counts[s] / total) for s in ordered if total]


class BatchesPage(MethodView):
    @console_page("read")
    def get(self):
        """The newest batches."""
        return render_template("console/batches.html", batches=recent_batches())


class BatchPage(MethodView):
    @console_page("read")
    def get(self, batch_id):
        """A batch: its progress by status and every run."""
        summary = batches.summary(parse_uuid(batch_id, "batch_id"))
        return render_template("console/batch.html", summary=summary,
                               bar=status_bar(summary["counts"], summary["total"]))


class BatchRevoke(MethodView):
    @console_page("control")
    def post(self, batch_id):
        """Revoke the batch's runs that are still queued."""
        batches.revoke(parse_uuid(batch_id, "batch_id"), reason="from the console",
                       revoked_by=caller())
        return redirect(url_for("console.batch", batch_id=batch_id))


blp.add_url_rule("/batches", view_func=BatchesPage.as_view("batches"))
blp.add_url_rule("/batches/<batch_id>", view_func=BatchPage.as_view("batch"))
blp.add_url_rule("/batches/<batch_id>/revoke", view_func=BatchRevoke.as_view("batch_revoke"))
