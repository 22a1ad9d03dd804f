"""Schedules: next and last run, pause, resume and run now (scope admin, as the API)."""

from __future__ import annotations

from flask import redirect, render_template, url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.console import blp, console_page
from celery_api.resources.fields import parse_uuid
from celery_api.services import database, schedules

PAGE = 200


class SchedulesPage(MethodView):
    @console_page("admin")
    def get(self):
        """Every schedule by name, with its trigger, next and last run."""
        with database.unavailable_as():
            rows, total = schedules.listing(limit=PAGE)
            items = [dict(schedules.view(s), trigger=schedules.describe(s)) for s in rows]
        return render_template("console/schedules.html", schedules=items, total=total)


class ScheduleAction(MethodView):
    @console_page("admin", rate="launch")
    def post(self, schedule_id, action):
        """pause, resume or run (now)."""
        schedule_id = parse_uuid(schedule_id, "id")
        if action == "run":
            launched = schedules.run_now(schedule_id, launched_by=caller())
            return redirect(url_for("console.run", task_id=launched.id, notice="launched"))
        schedules.set_enabled(schedule_id, action == "resume")
        return redirect(url_for("console.schedules"))


blp.add_url_rule("/schedules", view_func=SchedulesPage.as_view("schedules"))
blp.add_url_rule("/schedules/<schedule_id>/<any(pause, resume, run):action>",
                 view_func=ScheduleAction.as_view("schedule_action"))
