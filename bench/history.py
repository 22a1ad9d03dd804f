#!/usr/bin/env python
"""History at scale, and what recording costs a launch (issue: durable history).

1. Fills N (default 1,000,000) runs into a fresh PostgreSQL database, spread over a
   year, then times the history queries the API runs (the real statements built by
   ``celery_api.services.history``), in the database and through the Flask stack:
     - first page, no filter
     - first page, task type + status + one week
     - a deep page (a cursor half way down the table)
   and prints each plan (EXPLAIN ANALYZE) to show the indexes used.
2. Times launches in one process against a private redis-server: the full launch
   (validate, record, publish) against publish alone (the same message, no record),
   on PostgreSQL and on SQLite.

Usage: .venv/bin/python bench/history.py [--rows 1000000] [--repeat 50] [--launches 2000]
Needs PostgreSQL (CELERY_API_BENCH_POSTGRES, default postgresql://postgres@127.0.0.1:5432/postgres)
and a redis-server binary. Prints a markdown report; --write puts it in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from bench.common import migrated_app, postgres_database, report, timed  # noqa: E402
from celery_api.extensions import db  # noqa: E402
from celery_api.models import TaskRun, utcnow  # noqa: E402
from celery_api.services import history, launch  # noqa: E402
from tests.support import RedisServer  # noqa: E402

TYPES = ["sii.sync_documents", "sii.sync_f29", "sii.sync_documents_all_companies",
         "sii.sync_f29_all_companies", "billing.invoice", "billing.refund", "media.resize",
         "reports.monthly"]

FILL_SQL = """
INSERT INTO task_runs (id, task_type, task_name, params, status, tags, retries, attempts,
                       queue, created_at, started_at, finished_at, runtime, root_id,
                       company_id, worker)
SELECT id, task_type, task_type, '{}'::json, status, '[]'::json, 0, 1, 'celery',
       created_at, created_at + interval '1 second',
       CASE WHEN status IN ('SUCCESS', 'FAILURE', 'REVOKED')
            THEN created_at + interval '5 seconds' END,
       CASE WHEN status IN ('SUCCESS', 'FAILURE', 'REVOKED') THEN 4.0 END,
       id, company_id, 'worker@bench'
FROM (
  SELECT gen_random_uuid()::text AS id,
         (ARRAY[%(types)s])[1 + (i %% %(ntypes)s)] AS task_type,
         CASE WHEN r < 0.80 THEN 'SUCCESS' WHEN r < 0.90 THEN 'FAILURE'
              WHEN r < 0.93 THEN 'REVOKED' WHEN r < 0.97 THEN 'PENDING'
              ELSE 'STARTED' END AS status,
         now() - (random() * 365) * interval '1 day' AS created_at,
         CASE WHEN i %% 3 = 0 THEN ((i %% 500)::text || '-0000-4000-8000-000000000000')
         END AS company_id
  FROM generate_series(%(start)s, %(stop)s) AS i, LATERAL (SELECT random() + i * 0 AS r) x
) s
"""


def fill(url: str, rows: int) -> float:
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        chunk = 250_000
        sql = FILL_SQL.replace("%(types)s", ",".join(f"'{t}'" for t in TYPES))
        for start in range(1, rows + 1, chunk):
            conn.execute(sql % {"ntypes": len(TYPES), "start": start,
                                "stop": min(rows, start + chunk - 1)})
        conn.execute("INSERT INTO task_run_tags (run_id, tag) SELECT id, 'nightly' FROM "
                     "task_runs WHERE id LIKE '0%' OR id LIKE '1%'")
        conn.execute("VACUUM ANALYZE task_runs")
        conn.execute("VACUUM ANALYZE task_run_tags")
    return time.monotonic() - started


def explain(statement) -> str:
    compiled = statement.compile(dialect=db.engine.dialect,
                                 compile_kwargs={"literal_binds": True})
    with db.engine.connect() as conn:
        plan = conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {compiled}"))
        return "\n".join(row[0] for row in plan)


def history_section(rows: int, repeat: int) -> str:
    with postgres_database() as url:
        # Measured like Flower, which has no keys: authentication off.
        app = migrated_app(Path(tempfile.mkdtemp(prefix="bench-history-")), url)
        seconds = fill(url, rows)
        lines = [f"Filled {rows:,} runs (8 task types, 80% SUCCESS, 10% FAILURE, a year of "
                 f"created_at) in {seconds:.0f} s.", ""]
        client = app.test_client()
        with app.app_context():
            now = utcnow()
            middle = db.session.execute(
                sa.select(TaskRun).order_by(TaskRun.created_at.desc(), TaskRun.id.desc())
                .offset(rows // 2).limit(1)).scalar_one()
            deep_cursor = history.encode_cursor(middle)
            week = {"created_after": now - timedelta(days=40),
                    "created_before": now - timedelta(days=33)}
            cases = {
                "first page, no filter": history.HistoryQuery(limit=50),
                "task type + status + one week": history.HistoryQuery(
                    task_types=["sii.sync_f29"], statuses=["FAILURE"], limit=50, **week),
                f"deep page (cursor at row {rows // 2:,})": history.HistoryQuery(
                    limit=50, cursor=deep_cursor),
                "tag + status": history.HistoryQuery(tag="nightly", statuses=["FAILURE"],
                                                     limit=50),
            }
            http = {
                "first page, no filter": "/api/celery/history?limit=50",
                "task type + status + one week": (
                    "/api/celery/history?limit=50&task_type=sii.sync_f29&status=FAILURE"
                    f"&created_after={week['created_after'].isoformat().replace('+', '%2B')}"
                    f"&created_before={week['created_before'].isoformat().replace('+', '%2B')}"),
                f"deep page (cursor at row {rows // 2:,})":
                    f"/api/celery/history?limit=50&cursor={deep_cursor}",
                "tag + status": "/api/celery/history?limit=50&tag=nightly&status=FAILURE",
            }
            lines += ["| query | rows | SQL median ms | SQL p95 ms | HTTP median ms | "
                      "HTTP p95 ms |", "| --- | --- | --- | --- | --- | --- |"]
            plans = []
            for label, query in cases.items():
                statement = history.build_statement(query)

                def run_sql(statement=statement):
                    db.session.execute(statement).scalars().all()
                    db.session.rollback()

                run_sql()
                sql_med, sql_p95 = timed(run_sql, repeat)

                def run_http(path=http[label]):
                    response = client.get(path)
                    assert response.status_code == 200, response.get_data(as_text=True)

                run_http()
                http_med, http_p95 = timed(run_http, repeat)
                count = len(db.session.execute(statement).scalars().all()) - 1
                db.session.rollback()
                lines.append(f"| {label} | {min(count, 50)} | {sql_med:.2f} | {sql_p95:.2f} "
                             f"| {http_med:.2f} | {http_p95:.2f} |")
                plans.append(f"**{label}**\n\n```\n{explain(statement)}\n```\n")
            db.session.remove()
            db.engine.dispose()
        return "\n".join(lines) + "\n\nPlans (EXPLAIN ANALYZE, BUFFERS):\n\n" + "\n".join(plans)


def _rate(app, launches: int, threads: int, one) -> float:
    """Launches per second of ``one()`` called ``launches`` times over ``threads``."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(count):
        with app.app_context():
            for _ in range(count):
                one()
            db.session.remove()

    share = [launches // threads] * threads
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, share))
    return sum(share) / (time.perf_counter() - started)


def launch_section(launches: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    lines = ["| database | threads | full launch (validate + record + publish) /s | "
             "publish only /s | recording's share of a launch |",
             "| --- | --- | --- | --- | --- |"]
    with postgres_database() as pg_url:
        redis = RedisServer(folder / "redis").start()
        try:
            for label, url in (("PostgreSQL", pg_url), ("SQLite (WAL)", None)):
                app = migrated_app(folder / label.split()[0], url, CELERY={
                    "broker_url": redis.url, "result_backend": redis.url})
                params = {"company_id": "94d8658c-c8bf-58e5-aaca-c14fac456724"}
                with app.app_context():
                    definition, clean = launch.validate("sii.sync_documents", params)

                def full(params=params):
                    launch.launch("sii.sync_documents", params)

                def publish_only(clean=clean, definition=definition):
                    task_id = str(uuid.uuid4())
                    record = {"id": task_id, "params": clean, "queue": "celery",
                              "root_id": task_id}
                    launch.publish(record, definition.celery_name, launch.LaunchOptions())

                for threads in (1, 8):
                    _rate(app, 200, threads, full)  # warm connections and pools
                    full_rate = _rate(app, launches, threads, full)
                    publish_rate = _rate(app, launches, threads, publish_only)
                    lines.append(f"| {label} | {threads} | {full_rate:,.0f} "
                                 f"| {publish_rate:,.0f} | {1 - full_rate / publish_rate:.0%} |")
                with app.app_context():
                    db.engine.dispose()
        finally:
            redis.stop()
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--launches", type=int, default=2000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    sections = [f"## History at scale ({args.rows:,} runs, PostgreSQL, {args.repeat} repeats)",
                "", history_section(args.rows, args.repeat), "",
                f"## What recording costs a launch ({args.launches:,} launches, one process, "
                "private redis-server)", "", launch_section(args.launches), "",
                "The record is one INSERT and a durable COMMIT before the publish: on "
                "PostgreSQL that is a pool pre-ping, BEGIN, INSERT and COMMIT (four round "
                "trips and a WAL flush), on SQLite a local write. Publishing alone is Celery's "
                "`send_task` with no record and no validation.", ""]
    report("\n".join(sections), "history", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
