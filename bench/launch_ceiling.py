#!/usr/bin/env python
"""Launch throughput against its ceiling, per stack, in one run (issue 16, items 2 and 3).

For the default SQLite stack and for PostgreSQL, in the same run and under the same
gunicorn settings (gunicorn.conf.py), with the workers' consumers paused:

  api        POST /api/celery/tasks/launch, CELERY_API_AUTH=off (as Flower is measured)
  api+auth   the same with CELERY_API_AUTH=required and a key (its cache on, the default)
  flower     Flower's POST /api/task/async-apply
  bare       bench/bare_app.py: a Flask endpoint that only calls send_task

Targets: api >= 2x flower, api >= 0.7x bare, api+auth >= 0.95x api. Medians over
--rounds rounds, the four measured in turn within a round. --write puts the table in
docs/BENCHMARKS.md ("launch" section). ``bench/compare.py`` starts the same servers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import BIN, LiveServer  # noqa: E402

STACKS = ("sqlite", "postgres")


class BareServer(LiveServer):
    """bench/bare_app.py under gunicorn with this project's gunicorn.conf.py."""

    APP = "bare_app:app"


def create_key(env: dict, name: str = "bench") -> str:
    """A launch key in the bench's database (``flask keys create``); the key."""
    out = subprocess.run([str(BIN / "flask"), "--app", "wsgi", "keys", "create", name,
                          "--scope", "launch", "--scope", "read"],
                         env=dict(env, CELERY_API_AUTH="required"), cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def start_servers(system) -> None:
    """The bare endpoint and an authenticated API beside ``system``'s (compare.System)."""
    system.bare = BareServer(system.env, system.folder / "bare.log",
                             CELERY_API_AUTH="off").start()
    system.processes.append(system.bare)
    system.key = create_key(system.env)
    system.api_auth = LiveServer(system.env, system.folder / "gunicorn-auth.log",
                                 CELERY_API_AUTH="required").start()
    system.processes.append(system.api_auth)


def measure(system, seconds: float) -> dict:
    """One round: the four launch endpoints in turn (the caller pauses the workers), each
    after ``system.settle()`` (a CHECKPOINT on PostgreSQL)."""
    from bench.compare import FLOWER_BODY, LAUNCH_BODY, wrk

    launch = "/api/celery/tasks/launch"
    endpoints = {
        "api": (f"{system.api.url}{launch}", LAUNCH_BODY, None),
        "api_auth": (f"{system.api_auth.url}{launch}", LAUNCH_BODY,
                     {"Authorization": f"Bearer {system.key}"}),
        "flower": (f"{system.flower_url}/api/task/async-apply/bench.noop", FLOWER_BODY, None),
        "bare": (f"{system.bare.url}/launch/bench.noop", FLOWER_BODY, None),
    }
    results = {}
    for name, (url, body, headers) in endpoints.items():
        system.settle()
        results[name] = wrk(url, seconds, method="POST", body=body, folder=system.folder,
                            headers=headers)
    return results


def rows(rounds: list[dict]) -> list[tuple]:
    """(measure, result, ratio, target, met) for the launch targets: the ratio of the
    medians, and in the result the range of the ratios within each round (the two
    endpoints measured minutes apart at most: how far the machine's speed moved)."""
    med = {k: statistics.median(r[k]["rps"] for r in rounds)
           for k in ("api", "api_auth", "flower", "bare")}
    api = med["api"]

    def spread(a: str, b: str) -> str:
        ratios = [r[a]["rps"] / r[b]["rps"] for r in rounds if r[b]["rps"]]
        if len(ratios) < 2:
            return ""
        return f" (rounds: {min(ratios):.2f}x to {max(ratios):.2f}x)"

    return [
        ("launch vs Flower",
         f"{api:,.0f} vs {med['flower']:,.0f} req/s{spread('api', 'flower')}",
         api / med["flower"], ">= 2x", api >= 2 * med["flower"]),
        ("launch vs bare send_task endpoint",
         f"{api:,.0f} vs {med['bare']:,.0f} req/s{spread('api', 'bare')}",
         api / med["bare"], ">= 0.7x", api >= 0.7 * med["bare"]),
        ("authenticated launch vs launch",
         f"{med['api_auth']:,.0f} vs {api:,.0f} req/s{spread('api_auth', 'api')}",
         med["api_auth"] / api, ">= 0.95x", med["api_auth"] >= 0.95 * api),
    ]


def table(results: dict[str, list[dict]], args) -> str:
    from bench.compare import USE_WRK

    load = "wrk -t2 -c16" if USE_WRK else "bench/loadgen.py, 16 connections"
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.rounds} round(s) "
        f"of {args.seconds:.0f} s per endpoint, {load}; private redis-server, two paused "
        "`-c 1` workers; the API, the authenticated API and the bare endpoint each under "
        "gunicorn.conf.py (2 workers x 4 threads); Flower 2.", "",
        "| stack | measure | result | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |"]
    for stack, rounds in results.items():
        for name, value, ratio, target, met in rows(rounds):
            lines.append(f"| {stack} | {name} | {value} | {ratio:.2f}x | {target} | "
                         f"{'yes' if met else '**no**'} |")
    lines += ["", "| stack | endpoint | req/s (median) | p50 ms | p99 ms | errors |",
              "| --- | --- | --- | --- | --- | --- |"]
    for stack, rounds in results.items():
        for key in ("api", "api_auth", "flower", "bare"):
            lines.append(
                f"| {stack} | {key} | {statistics.median(r[key]['rps'] for r in rounds):,.0f}"
                f" | {statistics.median(r[key]['p50_ms'] for r in rounds):.2f}"
                f" | {statistics.median(r[key]['p99_ms'] for r in rounds):.2f}"
                f" | {sum(r[key]['errors'] for r in rounds)} |")
    return "\n".join(lines)


def main() -> int:
    from bench.compare import System

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--stack", choices=STACKS, action="append")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for stack in args.stack or STACKS:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-launch-{stack}-"))
        system = System(folder, smoke=False, database=stack)
        try:
            system.start()
            if system.database is None and stack == "postgres":
                print("PostgreSQL unreachable: its rows are left out", file=sys.stderr)
                continue
            rounds = []
            for _ in range(args.rounds):
                system.pause_workers()
                try:
                    rounds.append(measure(system, args.seconds))
                finally:
                    system.purge()
                    system.resume_workers()
            results[stack] = rounds
        finally:
            system.stop()
            shutil.rmtree(folder, ignore_errors=True)
    text = table(results, args)
    print(text)
    if args.write:
        from bench.common import write_section

        write_section("launch", "## Launch against its ceiling, per stack\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
