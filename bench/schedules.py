#!/usr/bin/env python
"""Schedules at scale: beat's tick time and the firing lateness (issue 14).

N schedules (default 10,000) are written straight into a fresh database, each due once
within the next ``--seconds`` (spread evenly; interval one hour, so each fires once),
then the tick beat runs (``services.schedules.fire_all_due``) is called every
``CELERY_API_DISPATCH_INTERVAL`` (1 s) in this process, as beat calls it, publishing to
a private redis-server. Measured: each tick's time, the lateness of each run (its
``created_at`` minus its ``scheduled_for``), and an idle tick (nothing due) over the N
schedules. On SQLite and, when reachable, PostgreSQL.

Usage: .venv/bin/python bench/schedules.py [--schedules 10000] [--seconds 100] [--write]
Needs a redis-server binary; PostgreSQL at CELERY_API_BENCH_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/postgres) is optional.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from bench.common import (  # noqa: E402
    drop_database,
    migrated_app,
    percentile,
    reachable_database,
    report,
)
from celery_api.extensions import db  # noqa: E402
from celery_api.models import Schedule, TaskRun, utcnow  # noqa: E402
from celery_api.services import schedules  # noqa: E402
from tests.support import RedisServer  # noqa: E402


def run(label: str, database_url: str, broker: str, folder: Path, count: int,
        seconds: float) -> dict:
    app = migrated_app(folder, database_url,
                       CELERY={"broker_url": broker, "result_backend": broker})
    interval = app.config["DISPATCH_INTERVAL"]
    with app.app_context():
        start = utcnow() + timedelta(seconds=2)
        now = utcnow()
        rows = [{"id": str(uuid.uuid4()), "name": f"bench-{i:06d}",
                 "task_type": "sii.sync_documents_all_companies",
                 "params": {"months": 1, "month_offset": 0}, "tags": [],
                 "timezone": "UTC", "interval_seconds": 3600.0, "enabled": True,
                 "overlap": "skip", "runs_fired": 0, "runs_skipped": 0,
                 "next_run_at": start + timedelta(seconds=seconds * i / count),
                 "created_at": now, "updated_at": now} for i in range(count)]
        for offset in range(0, count, 1000):
            db.session.execute(sa.insert(Schedule), rows[offset:offset + 1000])
        db.session.commit()
        # An idle tick: nothing due yet, the index answers.
        idle = []
        for _ in range(20):
            began = time.perf_counter()
            schedules.fire_all_due()
            idle.append(time.perf_counter() - began)
        db.session.remove()
        ticks, deadline = [], time.monotonic() + seconds + 5
        while time.monotonic() < deadline:
            began = time.perf_counter()
            fired = schedules.fire_all_due()
            took = time.perf_counter() - began
            db.session.remove()
            if fired:
                ticks.append((took, fired))
            time.sleep(max(0.0, interval - took))
        late = [(created - scheduled).total_seconds() for created, scheduled in
                db.session.execute(sa.select(TaskRun.created_at, TaskRun.scheduled_for)
                                   .where(TaskRun.schedule_id.is_not(None)))]
        db.session.remove()
        db.engine.dispose()
    times = [t for t, _ in ticks]
    per_run = [t / n * 1000 for t, n in ticks]
    return {"label": label, "runs": len(late), "ticks": len(ticks),
            "idle_ms": statistics.median(idle) * 1000,
            "tick_p50": percentile(times, 50) * 1000, "tick_p99": percentile(times, 99) * 1000,
            "per_run_ms": statistics.median(per_run),
            "late_p50": percentile(late, 50), "late_p99": percentile(late, 99),
            "late_max": max(late), "per_second": count / seconds}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-schedules-") as tmp:
        folder = Path(tmp)
        redis_server = RedisServer(folder / "redis").start()
        try:
            results.append(run("SQLite", f"sqlite:///{folder / 'bench.db'}",
                               redis_server.url, folder / "sqlite", args.schedules,
                               args.seconds))
            url, name = reachable_database()
            if url:
                try:
                    results.append(run("PostgreSQL", url.replace(
                        "postgresql://", "postgresql+psycopg://"), redis_server.url,
                        folder / "pg", args.schedules, args.seconds))
                finally:
                    drop_database(name)
        finally:
            redis_server.stop()
    lines = [f"## Schedules: beat's tick at {args.schedules:,} schedules",
             "",
             f"{args.schedules:,} interval schedules due once each over {args.seconds:g} s "
             f"({args.schedules / args.seconds:,.0f} due per second), fired by the tick beat "
             "runs every second (`services.schedules.fire_all_due`, in one process, "
             "publishing to a private redis-server; no worker). Lateness is a run's "
             "`created_at` minus its `scheduled_for`.",
             "",
             "| database | runs | idle tick | tick p50 | tick p99 | per fire | lateness p50 "
             "| lateness p99 | lateness max |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['label']} | {r['runs']:,} | {r['idle_ms']:.1f} ms | "
                     f"{r['tick_p50']:.0f} ms | {r['tick_p99']:.0f} ms | "
                     f"{r['per_run_ms']:.2f} ms | {r['late_p50']:.2f} s | "
                     f"{r['late_p99']:.2f} s | {r['late_max']:.2f} s |")
    lines += ["", "A tick fires each due schedule in its own transactions (the fire record "
              "and the advance, then the run's record and its publish, then the run id on "
              "the fire): the time per fire bounds how many schedules can come due in the "
              "same second before lateness grows past the dispatch interval.", ""]
    report("\n".join(lines), "schedules", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
