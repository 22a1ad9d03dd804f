"""Worker and queue statistics: GET /stats."""

from __future__ import annotations

import marshmallow as ma
from flask.views import MethodView

from celery_api.resources.operation import operation
from celery_api.services import stats
from celery_api.smorest import Blueprint, Schema

blp = Blueprint("stats", __name__, url_prefix="/api/celery", description="Workers and queues")


class StatsSchema(Schema):
    """Every field but ``note`` is in every answer (required: typed non-optional in
    generated clients)."""

    active_tasks = ma.fields.Dict(required=True,
                                  metadata={"description": "Running tasks, by worker"})
    scheduled_tasks = ma.fields.Dict(required=True,
                                     metadata={"description": "ETA/countdown tasks, by worker"})
    registered_tasks = ma.fields.List(ma.fields.String(), required=True)
    worker_stats = ma.fields.Dict(required=True,
                                  metadata={"description": "celery inspect stats, by worker"})
    workers_online = ma.fields.List(ma.fields.String(), required=True)
    queues = ma.fields.Dict(required=True, keys=ma.fields.String(), values=ma.fields.Integer(),
                            metadata={"description": "Messages waiting, by queue"})
    inspect_timeout = ma.fields.Float(required=True,
                                      metadata={"description": "Seconds workers had to answer"})
    collected_in_seconds = ma.fields.Float(required=True)
    snapshot_at = ma.fields.DateTime(
        required=True,
        metadata={"description": "When the broadcasts (and queue reads) of this snapshot "
                                 "were sent"})
    snapshot_age_seconds = ma.fields.Float(
        required=True,
        metadata={"description": "Age of this snapshot, never above "
                                 "snapshot_max_age_seconds"})
    snapshot_max_age_seconds = ma.fields.Float(
        required=True,
        metadata={"description": "The bound on snapshot_age_seconds "
                                 "(CELERY_API_STATS_MAX_AGE_SECONDS; 0: collected per call)"})
    note = ma.fields.String(metadata={"description": "Present when no worker answered"})


@blp.route("/stats")
class Stats(MethodView):
    @operation(blp, "getStats", scope="read", limit="read", errors=(503,))
    @blp.response(200, StatsSchema)
    def get(self):
        """Workers, their tasks, and queue lengths"""
        return stats.snapshot()
