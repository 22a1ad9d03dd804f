"""The benchmark's task module (loaded with CELERY_API_TASK_MODULES=bench_tasks)."""

import marshmallow as ma
from celery import shared_task


class NoopParamsSchema(ma.Schema):
    n = ma.fields.Integer(load_default=0)


@shared_task(name="bench.noop")
def noop(n: int = 0) -> int:
    return n


def register(catalog):
    catalog.add("bench.noop", celery_name="bench.noop", params_schema=NoopParamsSchema,
                name="No-op", description="Returns n at once; for benchmarks.")
