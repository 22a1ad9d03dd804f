"""Schemathesis hooks for tests/test_fuzz.py (SCHEMATHESIS_HOOKS).

``Idempotency-Key``: schemathesis draws few distinct values ("0", "00"...), so it sends
one key with many bodies, which the API refuses by design (422, the key was used with
another request; README, Idempotency-Key), a rule no schema can say. In a positive
case, a schema-valid key is made unique per call; negative cases are sent as drawn.

The event stream: the document's ``schema`` of ``text/event-stream`` is the stream's
text (what OpenAPI 3.0 means, and what generated clients read); schemathesis reads a 3.0
stream's schema as each event's (its convention before 3.2's itemSchema). The hook
gives it each event's schema there, so every event it reads is still checked."""

from __future__ import annotations

import re
import uuid

import schemathesis

HEADER = "Idempotency-Key"
VALID = re.compile(r'^[!#-\[\]-~]{1,255}$')


@schemathesis.hook
def before_load_schema(context, raw_schema):
    from celery_api.resources.status.routes import EVENT_ITEM_SCHEMA

    for item in raw_schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for response in (operation.get("responses") or {}).values():
                stream = (response.get("content") or {}).get("text/event-stream")
                if stream is not None:
                    stream["schema"] = EVENT_ITEM_SCHEMA


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return  # a negative case is refused anyway; editing it would make it positive
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == HEADER.lower() and isinstance(headers[name], str) \
                and VALID.match(headers[name]):
            headers[name] = str(uuid.uuid4())
