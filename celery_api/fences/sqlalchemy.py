"""SQLAlchemy below ``Connection.execute``: one row inserted with the driver's cursor
(tests/test_fences.py checks what this relies on).

A single launch's record is one INSERT of one row on the autocommit engine
(``services.launch``). Through ``Connection.execute`` SQLAlchemy makes a Connection,
an execution context, looks the statement up in its compiled cache and processes the
parameters on every call: 0.07 to 0.08 ms of a launch's 1.0 to 1.1 ms of CPU in the
API process (docs/BENCHMARKS.md). :func:`insert_row` compiles the INSERT once per
engine and column set, processes the row with the columns' own bind processors (what
SQLAlchemy applies), and runs it on a connection of the engine's pool (its checkout
and checkin events included) with the driver's cursor. Errors come out as SQLAlchemy
raises them (``DBAPIError`` subclasses; a lost connection is invalidated, with the
pool's idle connections, and flagged ``connection_invalidated``), so callers see no
difference. The engine must be in autocommit (``services.database.autocommit_bind``):
nothing here commits.

Relied on:

- ``Insert.compile(dialect=..., column_keys=...)``: ``.string``, and
  ``.positiontup`` (the parameter names in order, for a positional paramstyle);
- ``TypeEngine.dialect_impl(dialect).bind_processor(dialect)``: the processor
  SQLAlchemy applies to a parameter of that type (TypeDecorators included);
- ``Engine.raw_connection()`` (which raises the driver's error when it cannot
  connect: wrapped here as ``Engine.connect`` does) and its ``cursor()``,
  ``invalidate()``, ``close()``; ``Pool.dispose()``;
  ``Dialect.is_disconnect(error, connection, cursor)``;
- ``DBAPIError.instance(statement, params, orig, dbapi_base_err,
  connection_invalidated=..., dialect=...)``: the exception SQLAlchemy raises for a
  driver's error.
"""

from __future__ import annotations

import threading
import weakref

from sqlalchemy import exc as sa_exc

# Per engine (dropped with it): {(statement, column names): what _compile makes}.
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def insert_row(engine, statement, row: dict) -> None:
    """Run ``statement`` (a Core INSERT of one table) for ``row`` on ``engine``, an
    autocommit engine: the row is committed when this returns."""
    sql, names, processors, positional = _compile(engine, statement, tuple(row))
    if positional:
        params = tuple(process(row[name]) if process else row[name]
                       for name, process in zip(names, processors, strict=True))
    else:
        params = {name: process(row[name]) if process else row[name]
                  for name, process in zip(names, processors, strict=True)}
    dialect = engine.dialect
    try:
        connection = engine.raw_connection()
    except dialect.loaded_dbapi.Error as exc:  # the pool's connect raises it unwrapped
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error,
            connection_invalidated=dialect.is_disconnect(exc, None, None),
            dialect=dialect) from exc
    cursor = None
    try:
        cursor = connection.cursor()
        cursor.execute(sql, params)
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, connection.dbapi_connection, cursor)
        if lost:
            # As SQLAlchemy does: this connection is discarded, and the pool's idle ones,
            # likely lost too (a database restart), are closed.
            connection.invalidate(exc)
            engine.pool.dispose()
        raise sa_exc.DBAPIError.instance(
            sql, params, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost,
            dialect=dialect) from exc
    finally:
        if cursor is not None:
            try:
                cursor.close()
            except dialect.loaded_dbapi.Error:
                pass  # the cursor of a lost connection
        connection.close()


def _compile(engine, statement, keys: tuple) -> tuple:
    key = (statement, keys)
    found = _compiled.get(engine, {}).get(key)
    if found is not None:
        return found
    dialect = engine.dialect
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    positional = bool(compiled.positiontup)
    names = tuple(compiled.positiontup) if positional else tuple(compiled.params)
    missing = set(names) - set(keys)
    if missing:  # a column default the row does not carry: SQLAlchemy would add it
        raise ValueError(f"insert_row needs a value for every column it writes: "
                         f"{sorted(missing)} missing")
    table = getattr(statement, "table", None)  # an INSERT's; None for text()
    columns = table.c if table is not None else {}
    processors = tuple(columns[name].type.dialect_impl(dialect).bind_processor(dialect)
                       if name in columns else None for name in names)
    found = (compiled.string, names, processors, positional)
    with _lock:
        _compiled.setdefault(engine, {})[key] = found
    return found
