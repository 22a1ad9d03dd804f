"""The durable history of runs: GET /history."""

from __future__ import annotations

import marshmallow as ma
from flask import request, url_for
from flask.views import MethodView

from celery_api.resources.history.schemas import HistoryArgsSchema, HistoryPageSchema
from celery_api.resources.operation import operation
from celery_api.services import history
from celery_api.smorest import Blueprint

blp = Blueprint("history", __name__, url_prefix="/api/celery", description="History of runs")


@blp.route("/history")
class History(MethodView):
    @operation(blp, "listHistory", scope="read", limit="read", errors=(503,))
    @blp.arguments(HistoryArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, HistoryPageSchema, headers={
        "Link": {"description": 'The next page, as `<url>; rel="next"`',
                 "schema": {"type": "string"}}})
    def get(self, args):
        """List runs, newest first

        Every run is kept in the database, whoever launched it. Filters combine with
        AND; repeatable ones (`task_type`, `status`) match any of their values.
        Pages follow `next_cursor` (keyset pagination: stable while runs are added).
        """
        query = history.HistoryQuery(
            task_types=args.get("task_type") or [], statuses=args.get("status") or [],
            tag=args.get("tag"),
            company_id=str(args["company_id"]) if args.get("company_id") else None,
            parent_id=args.get("parent_id"), root_id=args.get("root_id"),
            retry_of=args.get("retry_of"), batch_id=args.get("batch_id"),
            schedule_id=args.get("schedule_id"), launched_by=args.get("launched_by"),
            revoked_by=args.get("revoked_by"), created_after=args.get("created_after"),
            created_before=args.get("created_before"),
            finished_after=args.get("finished_after"),
            finished_before=args.get("finished_before"), limit=args["limit"],
            cursor=args.get("cursor"))
        rows, next_cursor = history.page(query)
        headers = {}
        if next_cursor:
            params = request.args.to_dict(flat=False)
            params["cursor"] = [next_cursor]
            headers["Link"] = f'<{url_for("history.History", **params)}>; rel="next"'
        return {"items": rows, "next_cursor": next_cursor, "limit": query.limit}, 200, headers
