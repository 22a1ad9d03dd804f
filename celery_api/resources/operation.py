"""How an operation is declared: one decorator for what every operation of the API says.

``@operation(blp, "getSchedule", scope="admin", limit="read", errors=(404, 422, 503))``
stands for the four declarations each view needs, in the order they must apply:

- who may call it: ``auth.requires(scope)`` (``optional=True``: open, details for the
  scope), or ``auth.public`` with ``scope=PUBLIC``; an operation without one is refused
  at startup (``auth.undeclared``);
- what it counts against: ``limits.rate_limited(limit)`` (``"read"`` or ``"launch"``;
  None: not rate limited, as the admin operations);
- the errors it documents, each a problem+json response (``smorest.error_responses``);
- its stable ``operationId`` and any other OpenAPI fields (``Blueprint.doc``).

Put it first, above ``@idempotent``, ``@blp.arguments`` and ``@blp.response``: the
caller is authenticated and counted before anything of the request is read, and the
rate limit documents its headers on the success responses declared below it.
"""

from __future__ import annotations

from collections.abc import Callable

from celery_api.auth import PUBLIC, public, requires
from celery_api.limits import rate_limited
from celery_api.smorest import error_responses

__all__ = ["PUBLIC", "operation"]


def operation(blp, operation_id: str, *, scope: str, optional: bool = False,
              limit: str | None = None, errors: tuple[int, ...] = (), **doc) -> Callable:
    def decorator(func):
        func = blp.doc(operationId=operation_id, **doc)(func)
        if errors:
            func = error_responses(blp, *errors)(func)
        if limit is not None:
            func = rate_limited(limit)(func)
        if scope == PUBLIC:
            return public(func)
        return requires(scope, optional=optional)(func)

    return decorator
