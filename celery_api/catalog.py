"""The catalog: which task types a client may launch, and with what parameters.

Each entry names its Celery task, describes itself and carries the marshmallow
schema its ``params`` are validated with. Views and services look task types up
here; nothing branches on a task type. Task modules contribute entries through a
``register(catalog)`` function; a deployment adds its own modules with
``CELERY_API_TASK_MODULES`` (comma separated import paths).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import marshmallow as ma
from flask import current_app
from limits import parse_many

from celery_api.smorest import unstorable_text

BUILTIN_MODULES = ("celery_api.tasks.sii",)
MAX_CACHE_TTL = 30 * 86400  # seconds: a task type's cache_ttl, and a launch's
_TASK_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class CatalogError(Exception):
    """A task module tried to register something invalid."""


@dataclass(frozen=True)
class TaskDefinition:
    task_type: str
    celery_name: str
    name: str
    description: str
    params_schema: type[ma.Schema]
    queue: str | None = None
    # True when running the task twice is harmless: it may then be redelivered
    # after a worker is lost instead of being recorded as failed.
    safe_to_repeat: bool = False
    # Launches of this task type allowed through the API, all callers together
    # ("10/minute"; celery_api.limits): None for no limit.
    rate_limit: str | None = None
    # Seconds a successful run answers identical launches (services.result_cache); an
    # identical run in flight answers them too. None: launches run anew unless they ask
    # for the cache with cache_ttl.
    cache_ttl: int | None = None

    @cached_property
    def _schema(self) -> ma.Schema:
        # One instance per task type: loading and dumping do not change a schema.
        return self.params_schema()

    def validate(self, params: Any) -> dict:
        """Load ``params`` (raises ``ma.ValidationError``) and return them JSON-ready.

        Text no database can store (NUL, lone surrogates) is refused first, at any
        depth, keys included, whatever the task's own schema accepts: launches that do
        not come through the HTTP schemas (schedules, fan-out) are held to it too.
        """
        errors = unstorable_text(params)
        if errors:
            raise ma.ValidationError(errors)
        loaded = self._schema.load(params if params is not None else {})
        return self._schema.dump(loaded)

    @property
    def schema_name(self) -> str:
        return self.params_schema.__name__.removesuffix("Schema")


class Catalog:
    def __init__(self) -> None:
        self._entries: dict[str, TaskDefinition] = {}
        self._by_celery_name: dict[str, TaskDefinition] = {}

    def add(
        self,
        task_type: str,
        *,
        celery_name: str,
        params_schema: type[ma.Schema],
        name: str,
        description: str,
        queue: str | None = None,
        safe_to_repeat: bool = False,
        rate_limit: str | None = None,
        cache_ttl: int | None = None,
    ) -> TaskDefinition:
        if not _TASK_TYPE.match(task_type):
            raise CatalogError(f"task_type {task_type!r} must be dotted lower_snake_case")
        if task_type in self._entries:
            raise CatalogError(f"task_type {task_type!r} is registered twice")
        if not (isinstance(params_schema, type) and issubclass(params_schema, ma.Schema)):
            raise CatalogError(f"{task_type}: params_schema must be a marshmallow Schema class")
        if rate_limit is not None:
            try:
                parse_many(rate_limit)
            except ValueError:
                raise CatalogError(f"{task_type}: rate_limit must be a rate limit such as "
                                   f"'10/minute', got {rate_limit!r}") from None
        if cache_ttl is not None and not (
                isinstance(cache_ttl, int) and not isinstance(cache_ttl, bool)
                and 0 < cache_ttl <= MAX_CACHE_TTL):
            raise CatalogError(f"{task_type}: cache_ttl must be whole seconds from 1 to "
                               f"{MAX_CACHE_TTL} (or None), got {cache_ttl!r}")
        definition = TaskDefinition(
            task_type=task_type,
            celery_name=celery_name,
            name=name,
            description=description,
            params_schema=params_schema,
            queue=queue,
            safe_to_repeat=safe_to_repeat,
            rate_limit=rate_limit,
            cache_ttl=cache_ttl,
        )
        self._entries[task_type] = definition
        self._by_celery_name[celery_name] = definition
        return definition

    def get(self, task_type: str) -> TaskDefinition | None:
        return self._entries.get(task_type)

    def by_celery_name(self, celery_name: str) -> TaskDefinition | None:
        return self._by_celery_name.get(celery_name)

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(sorted(self._entries.values(), key=lambda d: d.task_type))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._entries


def load_catalog(modules: list[str] | tuple[str, ...]) -> Catalog:
    """Import each module and call its ``register(catalog)``."""
    catalog = Catalog()
    for module_name in (*BUILTIN_MODULES, *modules):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CatalogError(
                f"CELERY_API_TASK_MODULES names {module_name!r}, which cannot be imported: {exc}"
            ) from exc
        register = getattr(module, "register", None)
        if not callable(register):
            raise CatalogError(f"task module {module_name!r} has no register(catalog) function")
        register(catalog)
    return catalog


def get_catalog() -> Catalog:
    """The current app's catalog."""
    return current_app.extensions["celery_api.catalog"]


def queues_of(app) -> list[str]:
    """The queues a launch may name: ``CELERY_API_QUEUES``, the default one, the catalog's."""
    catalog = app.extensions["celery_api.catalog"]
    return sorted({app.config["CELERY"]["task_default_queue"], *app.config["QUEUES"],
                   *(d.queue for d in catalog if d.queue)})


def known_queues() -> list[str]:
    """The current app's queues, worked out once when it was created."""
    return current_app.extensions["celery_api.queues"]
