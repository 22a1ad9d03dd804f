"""A task module of the console's tests (tests/test_console.py): one task whose params
use every kind of field the launch form generates, and that holds its progress until
the test releases it (a Redis key), so the page is watched at a known point."""

import time

import marshmallow as ma
from celery import shared_task

RELEASE = "console:release:{}"


class WaitParamsSchema(ma.Schema):
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 64),
                           metadata={"description": "The Redis key that releases it"})
    steps = ma.fields.Integer(load_default=2, dump_default=2, strict=True,
                              validate=ma.validate.Range(2, 10))
    mode = ma.fields.String(load_default="fast", dump_default="fast",
                            validate=ma.validate.OneOf(["fast", "careful"]))
    loud = ma.fields.Boolean(load_default=False, dump_default=False)


@shared_task(bind=True, name="console.wait")
def wait(self, key: str, steps: int = 2, mode: str = "fast", loud: bool = False) -> dict:
    """Reports step 1 of ``steps``, then waits (at most 120 s) for its release key."""
    self.report_progress(1, steps, "waiting for release")
    client = self.app.backend.client
    deadline = time.monotonic() + 120
    while not client.exists(RELEASE.format(key)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} was never released")
        time.sleep(0.05)
    return {"released": key, "steps": steps, "mode": mode, "loud": loud}


def register(catalog):
    catalog.add("console.wait", celery_name="console.wait", params_schema=WaitParamsSchema,
                name="Wait for release", description="Holds at step 1 until released.")
