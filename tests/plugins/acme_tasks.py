"""A deployment's own task module, outside the celery_api package.

Loaded with CELERY_API_TASK_MODULES=acme_tasks (tests put this folder on PYTHONPATH).
"""

import marshmallow as ma
from celery import shared_task


class AddParamsSchema(ma.Schema):
    a = ma.fields.Integer(required=True)
    b = ma.fields.Integer(required=True, validate=ma.validate.Range(min=0))


@shared_task(name="acme.add")
def add(a: int, b: int) -> dict:
    return {"sum": a + b}


@shared_task(name="acme.boom")
def boom() -> None:
    raise RuntimeError("acme exploded on purpose")


class NoParamsSchema(ma.Schema):
    pass


def register(catalog):
    catalog.add("acme.add", celery_name="acme.add", params_schema=AddParamsSchema,
                name="Add two numbers", description="Adds a and b (b >= 0).")
    catalog.add("acme.boom", celery_name="acme.boom", params_schema=NoParamsSchema,
                name="Always fails", description="Raises RuntimeError.")
