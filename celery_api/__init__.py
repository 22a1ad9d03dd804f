"""celery-api: a REST control plane for Celery tasks."""

from __future__ import annotations

from functools import lru_cache
from inspect import iscoroutinefunction
from pathlib import Path

from flask import Flask
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

from celery_api import auth, edge, http, limits, metrics, settings
from celery_api.catalog import load_catalog, queues_of
from celery_api.celery_app import celery_init_app
from celery_api.extensions import db, make_api, migrate
from celery_api.logging import configure_logging
from celery_api.metrics_collector import SystemCollector
from celery_api.resources.fields import UUID_PARAMETER, TaskIdConverter, UuidPathConverter
from celery_api.services import cache, database, result_cache, stats

__version__ = "0.1.0"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class App(Flask):
    """Flask, asking once per function whether it is a coroutine function. Flask's
    ``ensure_sync`` asks it of every hook, view and handler on every request (28 times
    per launch: about 3% of its CPU), and the answer does not change; a method is asked
    by its function, as views are bound to a new instance per request. A coroutine
    function goes to Flask's own ``ensure_sync``, which Flask documents as the method
    to override."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The app's functions: a few dozen; the bound keeps anything else from growing it.
        self._is_coroutine = lru_cache(maxsize=1024)(lambda func: iscoroutinefunction(func))

    def ensure_sync(self, func):
        try:
            coroutine = self._is_coroutine(getattr(func, "__func__", func))
        except TypeError:  # an unhashable callable: asked each time
            coroutine = iscoroutinefunction(func)
        return super().ensure_sync(func) if coroutine else func


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` overrides the environment (``CELERY`` is merged key by key)."""
    config = dict(config or {})
    instance_path = Path(config.pop("INSTANCE_PATH", None) or settings.default_instance_path())
    app = App(__name__, instance_path=str(instance_path.resolve()))
    instance_path.mkdir(parents=True, exist_ok=True)
    _configure(app, config, instance_path)
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    _trust_proxies(app)

    db.init_app(app)
    _tune_sqlite(app)
    with app.app_context():
        for engine in db.engines.values():
            database.ping_when_idle(engine)
    migrate.init_app(app, db, directory=str(PROJECT_ROOT / "migrations"))
    app.extensions["celery_api.catalog"] = load_catalog(app.config["TASK_MODULES"])
    app.extensions["celery_api.queues"] = queues_of(app)
    celery_init_app(app)
    cache.init_app(app)
    stats.init_app(app)
    result_cache.init_app(app)

    api = _init_api(app)
    _register_blueprints(app, api)
    _register_params_components(app, api)

    http.init_app(app)  # request ids, JSON bodies, problem+json error handlers
    edge.init_app(app)  # the HTTP edge: body limits, security headers, CORS
    metrics.init_app(app, SystemCollector())
    auth.init_app(app)  # API keys and scopes (CELERY_API_AUTH)
    limits.init_app(app)  # rate limits and load shedding, counted once the caller is known

    from celery_api.cli import register_cli

    register_cli(app)
    return app


def _configure(app: Flask, config: dict, instance_path: Path) -> None:
    """Defaults, then the environment, then ``config``."""
    app.config.from_mapping(
        API_TITLE="celery-api",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api",
        OPENAPI_JSON_PATH="openapi.json",
        # Not pool_pre_ping: services.database.ping_when_idle checks idle connections.
        SQLALCHEMY_ENGINE_OPTIONS={},
        API_SPEC_OPTIONS={
            "info": {"description": "REST control plane for Celery tasks. See the README."},
        },
    )
    app.config.update(settings.from_environment(instance_path))
    celery_overrides = config.pop("CELERY", {})
    app.config.update(config)
    base = app.config["CELERY"]
    if {"broker_url", "result_backend"} & celery_overrides.keys():
        # Transport options follow the broker: rebuild them for the one given.
        base = settings.celery_config(
            celery_overrides.get("broker_url", base["broker_url"]),
            celery_overrides.get("result_backend", base["result_backend"]),
            app.config["BROKER_TIMEOUT"])
    app.config["CELERY"] = {**base, **celery_overrides}
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.normalize_database_url(
        app.config["SQLALCHEMY_DATABASE_URI"])
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        # A database that does not answer must not hold a request (libpq's minimum is 2 s).
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            **app.config["SQLALCHEMY_ENGINE_OPTIONS"],
            "connect_args": {"connect_timeout": app.config["DATABASE_CONNECT_TIMEOUT"]}}
    if not database.is_in_memory(app.config["SQLALCHEMY_DATABASE_URI"]):
        # (an in-memory SQLite database gets StaticPool from Flask-SQLAlchemy: no size)
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "pool_size": app.config["DATABASE_POOL_SIZE"],
            **app.config["SQLALCHEMY_ENGINE_OPTIONS"]}
    bind = database.autocommit_bind(app.config["SQLALCHEMY_DATABASE_URI"],
                                    app.config["SQLALCHEMY_ENGINE_OPTIONS"])
    if bind is not None:
        app.config["SQLALCHEMY_BINDS"] = {**app.config.get("SQLALCHEMY_BINDS", {}),
                                          database.AUTOCOMMIT_BIND: bind}


def _trust_proxies(app: Flask) -> None:
    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        # Behind nginx: client address, scheme, host and path prefix come from the
        # X-Forwarded-* headers the proxy sets, so Location headers, the OpenAPI
        # servers entry and the docs page use the public URL.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops,
                                x_port=hops, x_prefix=hops)


def _init_api(app: Flask):
    """The flask-smorest Api, with the path converters of task and batch ids."""
    # A path with "//" inside is no route (404 problem+json), not werkzeug's text/plain
    # 308 to the merged path (which also followed "%2e%2e%2f" up to "../"). Set before
    # the routes are added: each rule takes the map's setting when it is added.
    app.url_map.merge_slashes = False
    app.url_map.converters["task_id"] = TaskIdConverter
    app.url_map.converters["uuid_path"] = UuidPathConverter
    api = make_api()
    api.init_app(app)
    api.register_converter(TaskIdConverter, lambda _c: dict(UUID_PARAMETER))
    api.register_converter(UuidPathConverter, lambda _c: dict(UUID_PARAMETER))
    from celery_api.resources.webhooks.routes import register_converter

    register_converter(app, api)
    app.extensions["celery_api.api"] = api
    return api


def _tune_sqlite(app: Flask) -> None:
    """SQLite is shared by API and worker processes: WAL and a busy timeout let them."""
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        return

    def on_connect(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=15000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    with app.app_context():
        for engine in db.engines.values():  # the autocommit engine's too
            event.listen(engine, "connect", on_connect)


def _register_blueprints(app: Flask, api) -> None:
    from celery_api.resources.batches.routes import blp as batches_blp
    from celery_api.resources.health.routes import blp as health_blp
    from celery_api.resources.history.routes import blp as history_blp
    from celery_api.resources.schedules.routes import blp as schedules_blp
    from celery_api.resources.stats.routes import blp as stats_blp
    from celery_api.resources.status.routes import blp as status_blp
    from celery_api.resources.tasks.routes import blp as tasks_blp

    for blp in (tasks_blp, batches_blp, status_blp, history_blp, stats_blp, health_blp):
        api.register_blueprint(blp)
    api.register_blueprint(schedules_blp)
    from celery_api.resources.webhooks.routes import blp as webhooks_blp

    api.register_blueprint(webhooks_blp)
    from celery_api import console, docs

    app.register_blueprint(docs.blp)
    console.init_app(app)


def _register_params_components(app: Flask, api) -> None:
    """Each task type's params schema is its own OpenAPI component, and the launch
    request is a oneOf of the task types (generated clients build typed params)."""
    from celery_api.resources.tasks.routes import register_launch_request

    catalog = app.extensions["celery_api.catalog"]
    for definition in catalog:
        if definition.schema_name not in api.spec.components.schemas:
            api.spec.components.schema(definition.schema_name, schema=definition.params_schema)
    register_launch_request(api, catalog, app.extensions["celery_api.queues"])
    from celery_api.resources.schedules.routes import register_schedule_request

    register_schedule_request(api, catalog)
