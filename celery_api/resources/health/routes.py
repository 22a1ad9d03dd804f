"""Operations endpoints at the root: /healthz, /readyz (and /metrics, see metrics.py)."""

from __future__ import annotations

import marshmallow as ma
from flask.views import MethodView

from celery_api import metrics
from celery_api.auth import granted
from celery_api.resources.operation import PUBLIC, operation
from celery_api.services import health
from celery_api.smorest import Blueprint, Schema

blp = Blueprint("health", __name__, url_prefix="", description="Operations")


class LiveSchema(Schema):
    status = ma.fields.String(required=True, metadata={"example": "alive"})


class CheckSchema(Schema):
    status = ma.fields.String(required=True, metadata={"description": "up or down"})
    latency_ms = ma.fields.Float(required=True)
    detail = ma.fields.String()
    error = ma.fields.String(metadata={"description": "Why it is down"})


class ReadySchema(Schema):
    status = ma.fields.String(required=True, metadata={"description": "ready or unavailable"})
    checks = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Nested(CheckSchema),
                            required=True)


@blp.route("/healthz")
class Healthz(MethodView):
    @operation(blp, "getHealth", scope=PUBLIC)
    @blp.response(200, LiveSchema)
    def get(self):
        """Liveness: the process answers (checks nothing else)"""
        return {"status": "alive"}


@blp.route("/readyz")
class Readyz(MethodView):
    @operation(blp, "getReadiness", scope="read", optional=True)
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="A dependency is down")
    def get(self):
        """Readiness: database, broker and result backend reachable

        Each dependency with its status and latency (and the kind of error when it is
        down); 503 when one is down. With a `read` key (or authentication off), also what
        each dependency is and the error's message.
        """
        # Open: each dependency's status, latency and kind of error. Its address and the
        # error's message (which names hosts and sockets) only for a read key.
        ready, body = health.readiness(detailed=granted("read"))
        return body, 200 if ready else 503, {} if ready else {"Retry-After": "5"}


@blp.route("/metrics")
class Metrics(MethodView):
    @operation(blp, "getMetrics", scope="read", responses={"200": {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def get(self):
        """Prometheus metrics

        Requests and latencies per endpoint, launches per task type and outcome, queue
        depth per queue, workers online, and run durations per task type (history).
        """
        return metrics.exposition()
