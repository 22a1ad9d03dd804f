"""Database failures, told apart: the database being unavailable, or a bug.

A 503 invites a retry, so it is kept for failures a retry can cure: the database
cannot be reached, has dropped the connection, is out of resources or (SQLite) is
busy with another process's write past the busy timeout. Everything else that
SQLAlchemy raises (a constraint, a value the column refuses, a missing table, SQL
the database does not understand) comes back the same on every retry: it is a bug,
left to propagate to a 500 that is logged with its traceback.

Every service that talks to the database decides with ``is_unavailable``, and so
does the app's handler for what a service did not catch (``celery_api.http``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from celery_api.extensions import db
from celery_api.services.errors import Unavailable

UNREACHABLE = "The database is unreachable; try again shortly."

# PostgreSQL, by SQLSTATE class (psycopg maps all four to OperationalError, along with
# classes that are bugs or data: 54 "program limit exceeded", e.g. an index row too
# large, and 55 "object not in prerequisite state"; so the class decides, not the type).
#   08 connection exception   53 insufficient resources (disk full, out of memory,
#   too many connections)    57 operator intervention (shutdown, starting up, a
#   cancelled statement)     58 system error (I/O)
POSTGRES_UNAVAILABLE = frozenset({"08", "53", "57", "58"})
# SQLite, by primary result code. sqlite3 raises OperationalError for "no such table"
# and syntax errors too (SQLITE_ERROR), so the code decides. BUSY and LOCKED are
# another process holding the write lock past the busy timeout: the database is there
# but not available now, which a retry cures. The others are the file or the machine.
SQLITE_UNAVAILABLE = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot serve now, rather than that the
    statement or its data is wrong (see the module docstring)."""
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # the pool: a connection it could not keep, or none free in time
    if not isinstance(exc, sa_exc.DBAPIError):
        return False  # raised by SQLAlchemy itself: how it was used, never the server
    if exc.connection_invalidated:
        return True  # the dialect recognised a lost connection
    orig = exc.orig
    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is None:
            # No server answer to classify: the connection could not be made or was
            # lost on the client side (refused, timed out, closed).
            return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)
        return orig.sqlstate[:2] in POSTGRES_UNAVAILABLE
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in SQLITE_UNAVAILABLE
    # Another driver: PEP 249's own categories are the best guess there is.
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)


def rollback() -> None:
    """Roll the session back after a failure, which may have taken the connection."""
    try:
        db.session.rollback()
    except sa_exc.SQLAlchemyError:
        pass  # the connection is gone already; the pool replaces it


@contextmanager
def unavailable_as(detail: str = UNREACHABLE, **unavailable) -> Iterator[None]:
    """Database work in the request's session: rolled back on any failure; a
    connection-level failure is raised as ``Unavailable(detail, **unavailable)``,
    anything else propagates unchanged."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        rollback()
        if is_unavailable(exc):
            raise Unavailable(detail, **unavailable) from exc
        raise


# Single statements that commit themselves (a launch's record): an engine of their own.

AUTOCOMMIT_BIND = "autocommit"


def is_in_memory(uri: str) -> bool:
    """An in-memory SQLite database: the test Flask-SQLAlchemy applies to give such a
    database StaticPool (one connection, no pool size)."""
    url = make_url(uri)
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def autocommit_bind(uri: str, engine_options: dict) -> dict | None:
    """``SQLALCHEMY_BINDS`` entry of the autocommit engine: the same database and engine
    options, a pool of its own whose connections stay in autocommit, so a statement
    that is its own transaction pays no switch to autocommit and back per checkout (on
    SQLite a PRAGMA at each check-in: 0.14 against 0.09 ms of CPU per launch record,
    docs/BENCHMARKS.md), and on SQLite holds the write lock only while SQLite executes
    it, never across Python code between an INSERT and its COMMIT. Its connections are
    not rolled back when given back to the pool (``pool_reset_on_return=None``, as
    SQLAlchemy documents for autocommit connections): each statement committed or
    failed alone, there is no transaction to end. None for an in-memory SQLite
    database, which a second engine would not share."""
    if is_in_memory(uri):
        return None
    return {**engine_options, "url": uri, "isolation_level": "AUTOCOMMIT",
            "pool_reset_on_return": None}


def autocommit_engine():
    """The engine for one statement that is its own transaction (see autocommit_bind),
    or None (an in-memory SQLite database: switch a connection of the app's engine)."""
    return db.engines.get(AUTOCOMMIT_BIND)


# Pinging pooled connections: only those that sat idle (docs/BENCHMARKS.md).

PING_AFTER_IDLE_SECONDS = 1.0
_IDLE_SINCE = "celery_api.idle_since"


def ping_when_idle(engine) -> None:
    """Check a pooled connection before use only when it sat in the pool
    ``PING_AFTER_IDLE_SECONDS`` or more, instead of SQLAlchemy's ``pool_pre_ping`` on
    every checkout (a round trip and a ``SELECT 1`` per request under load).

    A connection that fails its check is replaced before use, as with pre-ping. One used
    within the last second is handed out as it is: if the database restarted in that
    second, its first statement fails as a lost connection, SQLAlchemy discards it and
    every older pooled connection, and the caller answers 503 (``is_unavailable``), save
    the launch's record, which is tried once more on a new connection
    (``services.launch.record_runs``).
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record):
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy):
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out a new one.
            raise sa_exc.DisconnectionError(f"a pooled connection was lost: {exc}") from exc
