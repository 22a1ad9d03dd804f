"""Signing in to the console with an API key, and out."""

from __future__ import annotations

import logging

from flask import current_app, g, redirect, render_template, request, url_for

from celery_api.auth import console_view
from celery_api.console import blp, clear_session_cookie, sessions, set_session_cookie
from celery_api.services import keys

log = logging.getLogger("celery_api.auth")


def _next_page() -> str:
    """Where to go after signing in: a console page of this site, else the runs."""
    target = request.values.get("next") or ""
    home = url_for("console.index")
    if target.startswith(home) and not target.startswith("//") and "\\" not in target:
        return target
    return home


@blp.route("/sign-in", methods=["GET", "POST"])
@console_view
def sign_in():
    if current_app.config["AUTH"] == "off" or (
            request.method == "GET" and g.console_viewer is not None):
        return redirect(_next_page())
    if request.method == "GET":
        return render_template("console/sign_in.html", next=_next_page(), error=None)
    presented = (request.form.get("key") or "").strip()
    try:
        record = keys.verify(presented)
    except keys.InvalidKey as exc:
        log.info("console sign-in refused: %s", exc.reason)
        return render_template("console/sign_in.html", next=_next_page(),
                               error=exc.reason), 401
    keys.touch(record)
    if g.console_viewer is not None:
        sessions.close(g.console_viewer)  # a new id on every sign-in (no fixation)
    response = redirect(_next_page())
    set_session_cookie(response, sessions.open_session(record))
    log.info("🔑 console sign-in with API key %s", record.name)
    return response


@blp.route("/sign-out", methods=["POST"])
@console_view
def sign_out():
    sessions.close(g.console_viewer)
    response = redirect(url_for("console.sign_in"))
    clear_session_cookie(response)
    return response
