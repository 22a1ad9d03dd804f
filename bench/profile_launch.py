#!/usr/bin/env python
"""CPU of one launch in the API process, and where it goes (issue 16's profile).

Builds the app in this process (production settings: auth off or required, rate
limits off, the result cache on; the bench's task type has no cache_ttl), with a private
redis-server as broker and SQLite or a fresh PostgreSQL database, then sends --count
launches through Flask's test client, one after another:

  cpu     ``time.process_time`` per launch (this process only: PostgreSQL's and Redis's
          own CPU are not in it), the median of --repeat runs
  profile cProfile of one run: the functions with the most time of their own, and
          the launch's parts (record, publish, parse/dump) by cumulative time

    .venv/bin/python bench/profile_launch.py --database postgres --count 1000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.common import create_database, drop_database  # noqa: E402
from tests.support import RedisServer, build_app, create_key, make_config  # noqa: E402

BODY = json.dumps({"task_type": "bench.noop", "params": {"n": 1}})
PARTS = ("record_runs", "publish", "_launch", "post", "verify", "dispatch_request",
         "full_dispatch_request", "wsgi_app")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--auth", action="store_true", help="CELERY_API_AUTH=required")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    redis = RedisServer(folder / "redis").start()
    database = None
    try:
        url = None
        if args.database == "postgres":
            url, database = create_database("celery_api_profile")
        app = build_app(make_config(folder, redis.url, url, TASK_MODULES=["bench_tasks"],
                                    AUTH="required" if args.auth else "off",
                                    RESULT_CACHE=True, LOG_LEVEL="WARNING"))
        headers = {"Content-Type": "application/json"}
        if args.auth:
            headers["Authorization"] = "Bearer " + create_key(app, "profile", "launch")
        client = app.test_client()

        def run(count: int) -> float:
            started = time.process_time()
            for _ in range(count):
                response = client.post("/api/celery/tasks/launch", data=BODY,
                                       headers=headers)
                assert response.status_code == 202, response.get_data(as_text=True)
            return (time.process_time() - started) / count * 1000

        run(50)  # warm: connections, caches, first-call imports
        cpu = [run(args.count) for _ in range(args.repeat)]
        print(f"{args.database}{' auth' if args.auth else ''}: CPU per launch "
              f"{statistics.median(cpu):.3f} ms (median of {args.repeat} x {args.count}; "
              f"runs {', '.join(f'{c:.3f}' for c in cpu)})")
        profile = cProfile.Profile()
        profile.enable()
        run(args.count)
        profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        print("\n".join(out.getvalue().splitlines()[:args.top + 12]))
        print("Parts, cumulative ms per launch under cProfile:")
        for (file, _line, name), row in sorted(stats.stats.items(), key=lambda i: -i[1][3]):
            if name in PARTS and ("celery_api" in file or "flask" in file):
                print(f"  {name:24s} {row[3] / args.count * 1000:7.3f}  "
                      f"{file.split('site-packages/')[-1].split('wt6-launchperf/')[-1]}")
    finally:
        redis.stop()
        if database:
            drop_database(database)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
