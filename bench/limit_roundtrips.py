#!/usr/bin/env python
"""Redis commands and round trips that rate limiting adds to one request (issue 16, item 3).

Builds the app in this process with a private redis-server as broker and as the
limiter's storage (REDIS_URL), SQLite for the history, then sends --count launches and
--count status reads through Flask's test client with the per-caller limits on (and a
task-type limit on the launches with --task-type-limit), and again with them off:

  commands     the server's own count (INFO commandstats, before and after)
  round trips  requests written to a socket by redis-py in this process (each
               ``send_packed_command``: a pipeline or a script is one)

Printed per request, limits on minus limits off, with the moving-window strategy
(the default; --strategy for another).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import redis  # noqa: E402
from redis.connection import AbstractConnection  # noqa: E402

from tests.support import RedisServer, build_app, make_config  # noqa: E402

BODY = json.dumps({"task_type": "bench.noop", "params": {"n": 1}})
HEADERS = {"Content-Type": "application/json"}
round_trips = 0
_send = AbstractConnection.send_packed_command


def _counted(self, command, check_health=True):
    global round_trips
    round_trips += 1
    return _send(self, command, check_health)


def commands(server: RedisServer) -> dict[str, int]:
    stats = redis.Redis(port=server.port).info("commandstats")
    return {name.removeprefix("cmdstat_"): row["calls"] for name, row in stats.items()}


def measure(server: RedisServer, folder: Path, count: int, *, limits: bool,
            strategy: str) -> dict:
    global round_trips
    config = make_config(folder, server.url, None, TASK_MODULES=["bench_tasks"],
                         REDIS_URL=server.url, RESULT_CACHE=True,
                         RATE_LIMIT_STRATEGY=strategy,
                         RATE_LIMIT_LAUNCH="100000/minute" if limits else "off",
                         RATE_LIMIT_READ="100000/minute" if limits else "off")
    app = build_app(config)
    client = app.test_client()
    launched = client.post("/api/celery/tasks/launch", data=BODY, headers=HEADERS)
    task_id = launched.get_json()["task_id"]
    client.get(f"/api/celery/tasks/{task_id}")  # warm: connections, scripts loaded
    out = {}
    for name, call in (
            ("launch", lambda: client.post("/api/celery/tasks/launch", data=BODY,
                                           headers=HEADERS)),
            ("status", lambda: client.get(f"/api/celery/tasks/{task_id}"))):
        before, round_trips = commands(server), 0
        for _ in range(count):
            assert call().status_code in (200, 202)
        trips = round_trips
        after = commands(server)
        after["info"] -= 1  # the INFO that read "before"
        diff = {k: (v - before.get(k, 0)) / count for k, v in after.items()
                if v != before.get(k, 0)}
        out[name] = {"round_trips": trips / count, "commands": diff}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--strategy", default="moving-window")
    args = parser.parse_args()
    AbstractConnection.send_packed_command = _counted
    folder = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    server = RedisServer(folder / "redis").start()
    try:
        for strategy in (args.strategy,):
            off = measure(server, folder / f"off-{strategy}", args.count, limits=False,
                          strategy=strategy)
            on = measure(server, folder / f"on-{strategy}", args.count, limits=True,
                         strategy=strategy)
            for name in ("launch", "status"):
                added = {k: round(v - off[name]["commands"].get(k, 0), 2)
                         for k, v in on[name]["commands"].items()
                         if round(v - off[name]["commands"].get(k, 0), 2)}
                print(f"{strategy:14s} {name:6s}: round trips per request "
                      f"{off[name]['round_trips']:.2f} off, {on[name]['round_trips']:.2f} on "
                      f"(+{on[name]['round_trips'] - off[name]['round_trips']:.2f}); "
                      f"commands added {added}")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
