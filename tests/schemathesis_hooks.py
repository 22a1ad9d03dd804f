"""Schemathesis hooks for tests/test_fuzz.py (SCHEMATHESIS_HOOKS).

``Idempotency-Key``: schemathesis draws few distinct values ("0", "00"...), so it sends
one key with many bodies, which the API refuses by design (422, the key was used with
another request; README, Idempotency-Key), a rule no schema can say. In a positive
case, a schema-valid key is made unique per call; negative cases are sent as drawn."""

from __future__ import annotations

import re
import uuid

import schemathesis

HEADER = "Idempotency-Key"
VALID = re.compile(r'^[!#-\[\]-~]{1,255}$')


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return  # a negative case is refused anyway; editing it would make it positive
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == HEADER.lower() and isinstance(headers[name], str) \
                and VALID.match(headers[name]):
            headers[name] = str(uuid.uuid4())
