#!/usr/bin/env python
"""The operator console on a large history (issue: operator console).

Fills N (default 1,000,000) runs into a fresh PostgreSQL database as bench/history.py
does, puts some of them in batches and gives one run a fan-out family, then times the
console's pages through the Flask stack (the whole request: session lookup, the same
history queries as GET /history, the template): the runs page with and without
filters, a deep page, a run's page and its live state, the batches and one batch.

Usage: .venv/bin/python bench/console.py [--rows 1000000] [--repeat 30] [--write]
Needs PostgreSQL (CELERY_API_BENCH_POSTGRES, default postgresql://postgres@127.0.0.1:5432/postgres).
Prints a markdown table; --write puts it in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from bench.common import migrated_app, postgres_database, report, timed  # noqa: E402
from bench.history import fill  # noqa: E402
from celery_api.extensions import db  # noqa: E402
from celery_api.models import TaskRun  # noqa: E402
from celery_api.services import history  # noqa: E402

BATCHES, BATCH_SIZE, CHILDREN = 200, 100, 50
NOTE = ("The batches page groups the batched runs (the sparse `batch_id` index holds only "
        "those): its cost grows with the number of runs in batches, not with the history.")

FAMILY_SQL = """
WITH picked AS (
  SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM task_runs
  ORDER BY id LIMIT %(batched)s
)
UPDATE task_runs SET batch_id = '00000000-0000-4000-8000-' || lpad((n / %(size)s)::text, 12, '0')
FROM picked WHERE task_runs.id = picked.id
"""


def families(url: str) -> tuple[str, str]:
    """Batches of BATCH_SIZE runs, and one run with CHILDREN fan-out children; the ids
    of that parent and of one batch."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FAMILY_SQL % {"batched": BATCHES * BATCH_SIZE, "size": BATCH_SIZE})
        parent = conn.execute("SELECT id FROM task_runs WHERE batch_id IS NULL "
                              "ORDER BY created_at DESC LIMIT 1").fetchone()[0]
        conn.execute(
            "UPDATE task_runs SET parent_id = %s, root_id = %s WHERE id IN (SELECT id FROM "
            "task_runs WHERE batch_id IS NULL AND id <> %s ORDER BY created_at DESC "
            "LIMIT %s)", (parent, parent, parent, CHILDREN))
        conn.execute("VACUUM ANALYZE task_runs")
    return parent, "00000000-0000-4000-8000-000000000007"


def console_section(rows: int, repeat: int) -> str:
    with postgres_database() as url:
        # Authentication off: the console opens a session on the first page, as with a
        # key (the same one-row lookup on every request).
        app = migrated_app(Path(tempfile.mkdtemp(prefix="bench-console-")), url,
                           RATE_LIMIT_READ="off", RATE_LIMIT_LAUNCH="off")
        seconds = fill(url, rows)
        parent, batch = families(url)
        client = app.test_client()
        with app.app_context():
            middle = db.session.execute(
                sa.select(TaskRun).order_by(TaskRun.created_at.desc(), TaskRun.id.desc())
                .offset(rows // 2).limit(1)).scalar_one()
            deep = history.encode_cursor(middle)
            db.session.remove()
        pages = {
            "runs, first page (live table)": "/console/runs",
            "runs: its live refresh (rows only)": "/console/runs?fragment=1",
            "runs: task type + status": "/console/runs?task_type=sii.sync_f29&status=FAILURE",
            "runs: tag + status": "/console/runs?tag=nightly&status=FAILURE",
            f"runs: deep page (cursor at row {rows // 2:,})": f"/console/runs?cursor={deep}",
            f"a run's page ({CHILDREN} fan-out children)": f"/console/runs/{parent}",
            "a run's live state (polled)": f"/console/runs/{parent}/state.json",
            f"batches ({BATCHES} batches of {BATCH_SIZE})": "/console/batches",
            f"one batch ({BATCH_SIZE} runs)": f"/console/batches/{batch}",
        }
        lines = [f"Filled {rows:,} runs as in the history benchmark in {seconds:.0f} s, "
                 f"{BATCHES * BATCH_SIZE:,} of them in {BATCHES} batches. Each page through "
                 f"the Flask stack (test client: session lookup, queries, template), "
                 f"{repeat} repeats after one warm-up.", "",
                 "| page | median ms | p95 ms | bytes |", "| --- | --- | --- | --- |"]
        for label, path in pages.items():
            first = client.get(path)
            assert first.status_code == 200, (path, first.get_data(as_text=True)[:500])

            def get(path=path):
                assert client.get(path).status_code == 200

            median, p95 = timed(get, repeat)
            lines.append(f"| {label} | {median:.1f} | {p95:.1f} | {len(first.data):,} |")
        lines += ["", NOTE]
        with app.app_context():
            db.engine.dispose()
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    least = BATCHES * BATCH_SIZE + CHILDREN + 1  # batched runs, then a family beside them
    if args.rows < least:
        parser.error(f"--rows must be at least {least:,}: {BATCHES} batches of "
                     f"{BATCH_SIZE} runs, and a parent with {CHILDREN} children outside them")
    text = "\n".join([f"## The console's pages on {args.rows:,} runs (PostgreSQL)", "",
                      console_section(args.rows, args.repeat)])
    report(text, "console", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
