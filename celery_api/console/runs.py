"""Runs: the live history table, a run's page, revoke and retry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import marshmallow as ma
import sqlalchemy as sa
from flask import jsonify, redirect, render_template, request, url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.catalog import get_catalog
from celery_api.console import blp, console_page
from celery_api.extensions import db
from celery_api.models import Schedule, TaskRun
from celery_api.resources.fields import EARLIEST, LATEST, STATES, known_state, parse_task_id
from celery_api.resources.history.schemas import HistoryArgsSchema
from celery_api.resources.status.waits import events_answer
from celery_api.services import control, database, history, runs, runstate, webhooks
from celery_api.services.history import MAX_LIMIT, HistoryQuery
from celery_api.smorest import unstorable_text

PAGE_SIZE = 50
CURSOR_CHECK = HistoryArgsSchema(only=("cursor",))
TEXT_FILTERS = ("tag", "batch_id", "schedule_id", "parent_id", "root_id", "retry_of")
DATE_FILTERS = ("created_after", "created_before")
MAX_LINEAGE = 200  # children and retries listed on a run's page
NOTICES = {
    "revoked": "Revoked: it will not run.",
    "terminating": "Stop signal sent: the status becomes REVOKED once the worker confirms.",
    "retried": "Retry launched: this is the new run.",
    "launched": "Launched.",
    "cached": "Answered by an identical run (result cache): no new run was launched; "
              "this is the run that answered.",
}


class FilterError(ValueError):
    pass


def _parse_time(name: str, value: str, offset_minutes: int) -> datetime:
    """A filter time from the form: ISO 8601 with a zone, or a date-time-local value in
    the viewer's zone (the script sends its offset; without it, UTC)."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC) + timedelta(minutes=offset_minutes)
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise FilterError(f"{name}: not a date and time (YYYY-MM-DDTHH:MM).") from None
    if not EARLIEST <= parsed <= LATEST:
        raise FilterError(f"{name}: between {EARLIEST.year} and {LATEST.year}.")
    return parsed


def parse_filters(args) -> tuple[HistoryQuery, dict]:
    """The history query from the page's query string, and the filters as given."""
    given = {k: v.strip() for k, v in args.items() if v and v.strip()}
    for name, value in given.items():
        if len(value) > 400 or unstorable_text(value):
            raise FilterError(f"{name}: at most 400 characters, without NUL or lone "
                              "surrogates.")
    query = HistoryQuery(limit=PAGE_SIZE)
    task_type = given.get("task_type")
    if task_type:
        query.task_types = [task_type]
    status = given.get("status")
    if status:
        if status not in STATES:
            raise FilterError(f"status: one of {', '.join(STATES)}.")
        query.statuses = [status]
    for name in TEXT_FILTERS:
        value = given.get(name)
        if value is not None:
            if len(value) > 155:
                raise FilterError(f"{name}: at most 155 characters.")
            setattr(query, name, value)
    company = given.get("company_id")
    if company:
        try:
            query.company_id = str(uuid.UUID(company))
        except ValueError:
            raise FilterError("company_id: a UUID such as "
                              "550e8400-e29b-41d4-a716-446655440000.") from None
    try:
        offset = max(-1440, min(1440, int(given.get("tz_offset", "0"))))
    except ValueError:
        offset = 0
    for name in DATE_FILTERS:
        if given.get(name):
            setattr(query, name, _parse_time(name, given[name], offset))
    cursor = given.get("cursor")
    if cursor:
        try:
            CURSOR_CHECK.load({"cursor": cursor})  # the API's: a cursor it issued
        except ma.ValidationError:
            raise FilterError("cursor: not one this service issued; start from the "
                              "newest runs.") from None
        query.cursor = cursor
    try:
        query.limit = max(1, min(int(given.get("limit", PAGE_SIZE)), MAX_LIMIT))
    except ValueError:
        query.limit = PAGE_SIZE
    return query, given


class RunsPage(MethodView):
    @console_page("read")
    def get(self):
        """The history, newest first, filtered; live when on its first page."""
        error = None
        try:
            query, given = parse_filters(request.args)
            rows, next_cursor = history.page(query)
        except FilterError as exc:
            error, given, rows, next_cursor = str(exc), dict(request.args), [], None
        params = {k: v for k, v in given.items() if k not in ("fragment", "cursor")}
        next_url = (url_for("console.runs", **params, cursor=next_cursor) if next_cursor
                    else None)
        filtered = any(k in given for k in ("task_type", "status", "company_id",
                                            *TEXT_FILTERS, *DATE_FILTERS))
        context = {"rows": rows, "next_url": next_url,
                   "newest_url": url_for("console.runs", **params), "given": given, "error": error,
                   "filtered": filtered, "live": not given.get("cursor"),
                   "task_types": [d.task_type for d in get_catalog()], "states": STATES}
        if request.args.get("fragment") == "1":
            return render_template("console/_run_rows.html", **context)
        return render_template("console/runs.html", **context)


blp.add_url_rule("/runs", view_func=RunsPage.as_view("runs"))


def lineage_of(run: TaskRun) -> dict:
    """The run's family: its ancestors up to the root, its fan-out children and retries
    (each with its status), its batch and its schedule. Indexed lookups only."""
    ancestors: list[TaskRun] = []
    with database.unavailable_as():
        parent_id = run.parent_id or (run.retry_of if run.retry_of != run.id else None)
        seen = {run.id}
        while parent_id and parent_id not in seen and len(ancestors) < 10:
            seen.add(parent_id)
            parent = db.session.get(TaskRun, parent_id)
            if parent is None:
                break
            ancestors.insert(0, parent)
            parent_id = parent.parent_id or parent.retry_of
        family = db.session.execute(
            sa.select(TaskRun.id, TaskRun.task_type, TaskRun.status, TaskRun.parent_id,
                      TaskRun.created_at, TaskRun.params)
            .where(sa.or_(TaskRun.parent_id == run.id, TaskRun.retry_of == run.id))
            .order_by(TaskRun.created_at).limit(MAX_LINEAGE + 1)).all()
        schedule = (db.session.get(Schedule, run.schedule_id) if run.schedule_id else None)
    children = [r for r in family if r.parent_id == run.id]
    retries = [r for r in family if r.parent_id != run.id]
    return {"ancestors": ancestors, "children": children, "retries": retries,
            "truncated": len(family) > MAX_LINEAGE, "schedule": schedule}


def run_json(view: runs.RunView) -> dict:
    run = view.run
    return {
        "task_id": run.id, "status": known_state(view.status),
        "finished": runstate.is_finished(view.status), "progress": view.progress,
        "worker": run.worker, "attempts": run.attempts,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


class RunPage(MethodView):
    @console_page("read")
    def get(self, task_id):
        """A run: params, status and progress, result or error, timings, lineage."""
        view = runs.describe(parse_task_id(task_id), lineage=False)
        notice = NOTICES.get(request.args.get("notice", ""))
        return render_template(
            "console/run.html", view=view, run=view.run, status=known_state(view.status),
            finished=runstate.is_finished(view.status),
            queued=view.status in runstate.QUEUED,
            retryable=view.status in runstate.RETRYABLE, lineage=lineage_of(view.run),
            notice=notice,
            webhook_deliveries=(webhooks.launch_deliveries(view.run.id)
                                if view.run.webhook_url else []))


class RunJson(MethodView):
    @console_page("read")
    def get(self, task_id):
        """The run's live state, polled by its page."""
        return jsonify(run_json(runs.describe(parse_task_id(task_id), lineage=False)))


class RunEvents(MethodView):
    @console_page("read")
    def get(self, task_id):
        """The run's live state as Server-Sent Events, followed by its page: the API's
        event stream (GET /tasks/{id}/events, the same waiting hub: no thread held per
        viewer) carrying this page's state document (``state.json``)."""
        return events_answer(parse_task_id(task_id), request.headers.get("Last-Event-ID"),
                             run_json)


class RunRevoke(MethodView):
    @console_page("control")
    def post(self, task_id):
        """Revoke a queued run, or (terminate) signal the worker running it."""
        terminate = request.form.get("terminate") == "1"
        outcome = control.revoke(parse_task_id(task_id), terminate=terminate,
                                 reason=(request.form.get("reason") or "").strip()[:200]
                                 or "from the console",
                                 revoked_by=caller())
        notice = "terminating" if outcome.accepted else "revoked"
        return redirect(url_for("console.run", task_id=task_id, notice=notice))


class RunRetry(MethodView):
    @console_page("launch", rate="launch")
    def post(self, task_id):
        """Retry a failed or revoked run: a new run, linked to this one."""
        launched = control.retry(parse_task_id(task_id), launched_by=caller())
        return redirect(url_for("console.run", task_id=launched.id, notice="retried"))


blp.add_url_rule("/runs/<task_id>", view_func=RunPage.as_view("run"))
blp.add_url_rule("/runs/<task_id>/state.json", view_func=RunJson.as_view("run_json"))
blp.add_url_rule("/runs/<task_id>/events", view_func=RunEvents.as_view("run_events"))
blp.add_url_rule("/runs/<task_id>/revoke", view_func=RunRevoke.as_view("run_revoke"))
blp.add_url_rule("/runs/<task_id>/retry", view_func=RunRetry.as_view("run_retry"))

