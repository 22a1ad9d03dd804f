"""A deployment's own task module, outside the celery_api package.

Loaded with CELERY_API_TASK_MODULES=acme_tasks (tests put this folder on PYTHONPATH).
"""

import time

import marshmallow as ma
from celery import shared_task


class AddParamsSchema(ma.Schema):
    a = ma.fields.Integer(required=True, strict=True)
    b = ma.fields.Integer(required=True, strict=True, validate=ma.validate.Range(min=0))


@shared_task(name="acme.add")
def add(a: int, b: int) -> dict:
    return {"sum": a + b}


@shared_task(name="acme.boom")
def boom() -> None:
    raise RuntimeError("acme exploded on purpose")


@shared_task(name="acme.garble")
def garble() -> None:
    """Fails with text no database stores as it is: a NUL and a lone surrogate."""
    raise RuntimeError("bad\x00byte \ud800 here")


class NoParamsSchema(ma.Schema):
    pass


class SleepParamsSchema(ma.Schema):
    seconds = ma.fields.Float(required=True, validate=ma.validate.Range(0, 600))


class CountParamsSchema(ma.Schema):
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 64))


@shared_task(bind=True, name="acme.count")
def count(self, key: str) -> int:
    """Counts its executions in the result backend's Redis: one INCR, one SADD of its id."""
    client = self.app.backend.client
    client.sadd(f"acme:runs:{key}", self.request.id)
    return client.incr(f"acme:count:{key}")


class CountSlowlyParamsSchema(CountParamsSchema):
    seconds = ma.fields.Float(required=True, validate=ma.validate.Range(0, 600))


@shared_task(bind=True, name="acme.count_slowly")
def count_slowly(self, key: str, seconds: float) -> int:
    """Safe to repeat: counts each execution as it starts, then works for a while."""
    client = self.app.backend.client
    client.sadd(f"acme:runs:{key}", self.request.id)
    count = client.incr(f"acme:count:{key}")
    _sleep(self, seconds)
    return count


def _sleep(task, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        task.report_progress(0, 1, "sleeping")
        time.sleep(0.05)
    return {"slept": seconds}


@shared_task(bind=True, name="acme.sleep")
def sleep(self, seconds: float) -> dict:
    """Not safe to repeat: a lost worker means a failed run."""
    return _sleep(self, seconds)


@shared_task(bind=True, name="acme.sleep_safely")
def sleep_safely(self, seconds: float) -> dict:
    """Safe to repeat: redelivered when its worker process is lost."""
    return _sleep(self, seconds)


class CountCachedParamsSchema(CountParamsSchema):
    step = ma.fields.Integer(strict=True, load_default=1, validate=ma.validate.Range(1, 10))
    seconds = ma.fields.Float(load_default=0.0, validate=ma.validate.Range(0, 600))


@shared_task(bind=True, name="acme.count_cached")
def count_cached(self, key: str, step: int = 1, seconds: float = 0.0) -> int:
    """Counts its executions (INCRBY step), then works ``seconds``: its catalog entry
    declares a cache_ttl (tests/test_result_cache.py)."""
    client = self.app.backend.client
    client.sadd(f"acme:runs:{key}", self.request.id)
    count = client.incrby(f"acme:count:{key}", step)
    _sleep(self, seconds)
    return count
class StepsParamsSchema(ma.Schema):
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 64))
    steps = ma.fields.Integer(required=True, validate=ma.validate.Range(1, 100))


@shared_task(bind=True, name="acme.steps")
def steps(self, key: str, steps: int) -> dict:
    """Held by the test: reports step n once the result backend's Redis counter
    ``acme:steps:KEY`` reaches n (tests INCR it), and ends after the last (60 s at most)."""
    client = self.app.backend.client
    deadline = time.monotonic() + 60
    done = 0
    while done < steps and time.monotonic() < deadline:
        reached = min(int(client.get(f"acme:steps:{key}") or 0), steps)
        if reached > done:
            done = reached
            self.report_progress(done, steps, f"step {done}")
        else:
            time.sleep(0.01)
    if done < steps:
        raise TimeoutError(f"released {done} of {steps} steps")
    return {"steps": steps}


def register(catalog):
    catalog.add("acme.add", celery_name="acme.add", params_schema=AddParamsSchema,
                name="Add two numbers", description="Adds a and b (b >= 0).")
    catalog.add("acme.boom", celery_name="acme.boom", params_schema=NoParamsSchema,
                name="Always fails", description="Raises RuntimeError.")
    catalog.add("acme.garble", celery_name="acme.garble", params_schema=NoParamsSchema,
                name="Fails with unstorable text", description="Raises with NUL in its message.")
    catalog.add("acme.count", celery_name="acme.count", params_schema=CountParamsSchema,
                name="Count", description="Counts its executions (load tests).")
    catalog.add("acme.count_slowly", celery_name="acme.count_slowly",
                params_schema=CountSlowlyParamsSchema, name="Count, then work",
                description="Counts its executions, then sleeps; safe to repeat.",
                safe_to_repeat=True)
    catalog.add("acme.sleep", celery_name="acme.sleep", params_schema=SleepParamsSchema,
                name="Sleep", description="Sleeps; not safe to repeat.")
    catalog.add("acme.sleep_safely", celery_name="acme.sleep_safely",
                params_schema=SleepParamsSchema, name="Sleep, safe to repeat",
                description="Sleeps; redelivered if its worker is lost.", safe_to_repeat=True)
    catalog.add("acme.count_cached", celery_name="acme.count_cached",
                params_schema=CountCachedParamsSchema, name="Count, cached",
                description="Counts its executions; answers identical launches for 60 s.",
                cache_ttl=60)
    catalog.add("acme.steps", celery_name="acme.steps", params_schema=StepsParamsSchema,
                name="Steps", description="Reports each step the test releases.")
