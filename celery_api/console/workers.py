"""Workers and queues: the /stats snapshot as a page, refreshed live."""

from __future__ import annotations

from flask import render_template, request
from flask.views import MethodView

from celery_api.console import blp, console_page
from celery_api.services import stats
from celery_api.services.errors import Unavailable


def workers_view(body: dict) -> list[dict]:
    """One entry per worker online: its pool, its active and scheduled runs."""
    rows = []
    for name in body["workers_online"]:
        info = body["worker_stats"].get(name) or {}
        pool = info.get("pool") or {}
        scheduled = []
        for entry in body["scheduled_tasks"].get(name) or []:
            task = entry.get("request") or {}
            scheduled.append({"id": task.get("id"), "name": task.get("name"),
                              "eta": entry.get("eta")})
        rows.append({
            "name": name,
            "concurrency": pool.get("max-concurrency"),
            "processed": sum((info.get("total") or {}).values()),
            "active": [{"id": t.get("id"), "name": t.get("name")}
                       for t in body["active_tasks"].get(name) or []],
            "scheduled": scheduled,
        })
    return rows


class WorkersPage(MethodView):
    @console_page("read")
    def get(self):
        """Workers online, their runs, the queues' depths, and the snapshot's age."""
        try:
            body, error = stats.snapshot(), None
        except Unavailable as exc:
            body, error = None, exc.detail
        context = {"body": body, "error": error,
                   "workers": workers_view(body) if body else []}
        template = ("console/_workers.html" if request.args.get("fragment") == "1"
                    else "console/workers.html")
        return render_template(template, **context), 200 if body else 503


blp.add_url_rule("/workers", view_func=WorkersPage.as_view("workers"))
