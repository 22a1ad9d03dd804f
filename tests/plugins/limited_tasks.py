"""A task module whose task type declares its own launch limit (tests/test_limits.py)."""

import marshmallow as ma
from celery import shared_task


class ValueParamsSchema(ma.Schema):
    value = ma.fields.Integer(load_default=0, strict=True)


@shared_task(name="limited.echo")
def echo(value: int = 0) -> dict:
    return {"value": value}


def register(catalog):
    catalog.add("limited.echo", celery_name="limited.echo", params_schema=ValueParamsSchema,
                name="Echo, rate limited", description="Returns its value; 3 launches an "
                "hour at most, all callers together.", rate_limit="3/hour")
