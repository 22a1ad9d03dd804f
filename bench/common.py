"""What the benchmark scripts share: a throwaway PostgreSQL database, the app migrated
onto a database, timing and percentiles, and the report each one prints and may write
into its own section of docs/BENCHMARKS.md.

The scripts run as ``python bench/<name>.py``: each puts the repository root on
``sys.path`` itself, then imports from here.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
POSTGRES_ADMIN = os.environ.get("CELERY_API_BENCH_POSTGRES",
                                "postgresql://postgres@127.0.0.1:5432/postgres")


def create_database(prefix: str = "celery_api_bench",
                    connect_timeout: float | None = None) -> tuple[str, str]:
    """A fresh database on the CELERY_API_BENCH_POSTGRES server: its URL and its name.
    psycopg is imported here: the scripts that can run without PostgreSQL need not have it."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True,
                         connect_timeout=connect_timeout) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name, name


def reachable_database() -> tuple[str | None, str | None]:
    """create_database when the PostgreSQL server answers within 3 s; (None, None)
    otherwise, said on stderr: the benchmarks that can run on SQLite alone then do."""
    try:
        return create_database(connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - optional
        print(f"PostgreSQL unavailable ({exc}): SQLite only", file=sys.stderr)
        return None, None


def drop_database(name: str) -> None:
    """Drop a database made by create_database, closing what is still connected to it."""
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_database(prefix: str = "celery_api_bench") -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped on the way out."""
    url, name = create_database(prefix)
    try:
        yield url
    finally:
        drop_database(name)


def migrated_app(folder: Path, database_url: str | None = None, **config):
    """The app in this process, measured as Flower is (authentication off), logging only
    warnings, on ``database_url`` (SQLite in ``folder`` when None), migrated to head."""
    import flask_migrate

    from celery_api import create_app

    settings = {"INSTANCE_PATH": folder, "LOG_LEVEL": "WARNING", "AUTH": "off", **config}
    if database_url:
        settings["SQLALCHEMY_DATABASE_URI"] = database_url
    app = create_app(settings)
    with app.app_context():
        flask_migrate.upgrade()
    return app


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and p95, in milliseconds, of ``fn()`` called ``repeat`` times."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``th percentile (0 to 100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def write_section(name: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace this benchmark's section of the report (or add it at the end)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def report(text: str, section: str, write: bool) -> None:
    """Print the report; with --write, put it in its section of docs/BENCHMARKS.md too."""
    print(text)
    if write:
        write_section(section, text)
