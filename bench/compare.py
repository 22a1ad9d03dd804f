#!/usr/bin/env python
"""This API against Flower's HTTP API and raw Celery, side by side in one run.

Starts a private redis-server (broker and results), two Celery workers, this API under
gunicorn with its production config (gunicorn.conf.py, PostgreSQL when reachable) and
Flower (from PyPI, in this environment), then drives them with wrk (or bench/loadgen.py
when wrk is not installed) from separate processes:

  launch    POST /api/celery/tasks/launch  vs  Flower POST /api/task/async-apply  vs  a raw
            send_task loop in one Python process (workers paused, queue purged after)
  status    GET /api/celery/tasks/{id}  vs  Flower GET /api/task/result/{id}, finished runs
  stats     GET /api/celery/stats  vs  Flower GET /api/workers?refresh=1, two workers up:
            one caller asking every 1.5 s (a dashboard, a probe), then back to back
  batch     1,000 tasks per POST /api/celery/tasks/batch  vs  1,000 single launches  vs
            the raw loop (workers paused)
  e2e       launch -> SUCCESS of a no-op through the API vs raw send_task, both polled
  memory    RSS of the API's gunicorn workers before and after 20,000 launches

Medians over --rounds rounds; ratios against the targets; --write puts the table in
docs/BENCHMARKS.md. --smoke runs every phase briefly with no targets (make test does).
--only stats runs the stats phase alone (with --write, into its own section).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from celery import Celery  # noqa: E402

from bench.common import (  # noqa: E402
    POSTGRES_ADMIN,
    drop_database,
    reachable_database,
    write_section,
)
from tests.support import (  # noqa: E402
    BIN,
    LiveServer,
    RedisServer,
    Worker,
    free_port,
    stop_process,
    wait_for,
)

LAUNCH_BODY = json.dumps({"task_type": "bench.noop", "params": {"n": 1}})
FLOWER_BODY = json.dumps({"kwargs": {"n": 1}})


# -- load generation -----------------------------------------------------------------

USE_WRK = bool(shutil.which("wrk"))


def wrk(url: str, seconds: float, *, method="GET", body=None, paths=None, threads=2,
        connections=16, folder: Path, headers: dict | None = None) -> dict:
    """Run wrk (or the Python generator) and return rps, p50, p99 and errors."""
    if not USE_WRK:
        total = max(200, int(seconds * 300))
        return loadgen(url, total, method=method, body=body, paths=paths,
                       connections=connections, headers=headers)
    script = folder / f"wrk-{uuid.uuid4().hex[:6]}.lua"
    lua = []
    if body:
        lua += [f"wrk.method = {json.dumps(method)}", f"wrk.body = {json.dumps(body)}",
                'wrk.headers["Content-Type"] = "application/json"']
    lua += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items()]
    if paths:
        lua.append("paths = {" + ",".join(json.dumps(p) for p in paths) + "}")
        lua.append('request = function() return wrk.format("GET", '
                   "paths[math.random(#paths)]) end")
    script.write_text("\n".join(lua) + "\n")
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency",
         "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    return {"rps": rps, "p50_ms": _wrk_ms(out, "50%"), "p99_ms": _wrk_ms(out, "99%"),
            "errors": int(errors.group(1)) if errors else 0
            + (sum(map(int, socket_errors.groups())) if socket_errors else 0)}


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def loadgen(url, total, *, method="GET", body=None, paths=None, connections=16,
            headers=None) -> dict:
    spec = {"url": url, "method": method, "body": body, "total": total,
            "connections": connections, "paths": paths, "headers": headers}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"),
                          json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


RAW_LOOP = """
import json, sys, time
from celery import Celery
broker, backend, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
app = Celery(broker=broker, backend=backend)
app.send_task("bench.noop", kwargs={"n": 1})  # connect
latencies = []
started = time.perf_counter()
while time.perf_counter() - started < seconds:
    t = time.perf_counter()
    app.send_task("bench.noop", kwargs={"n": 1})
    latencies.append(time.perf_counter() - t)
elapsed = time.perf_counter() - started
latencies.sort()
print(json.dumps({"rps": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1000,
                  "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000, "errors": 0}))
"""


def raw_loop(broker: str, backend: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-c", RAW_LOOP, broker, backend, str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout)


# -- the system under test -----------------------------------------------------------

class System:
    def __init__(self, folder: Path, *, smoke: bool, database: str = "auto"):
        self.folder = folder
        self.smoke = smoke
        self.database_kind = database  # auto (PostgreSQL when reachable), sqlite, postgres
        self.processes: list = []
        self.database = None

    def start(self) -> System:
        self.redis = RedisServer(self.folder / "redis").start()
        self.processes.append(self.redis)
        broker = self.redis.url
        backend = self.redis.url.replace("/0", "/1")
        database_url = self._database()
        self.env = dict(os.environ)
        self.env.update({
            "CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend,
            "DATABASE_URL": database_url, "INSTANCE_PATH": str(self.folder / "instance"),
            "CELERY_API_TASK_MODULES": "bench_tasks", "LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)]),
            "FLOWER_UNAUTHENTICATED_API": "true",
            # Like Flower's API here, this API is measured without API keys and
            # without per-caller rate limits (the load generator is one caller).
            "CELERY_API_AUTH": "off",
            "CELERY_API_RATE_LIMIT_LAUNCH": "off", "CELERY_API_RATE_LIMIT_READ": "off",
        })
        subprocess.run([str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], env=self.env,
                       cwd=ROOT, check=True, capture_output=True)
        self.celery = Celery(broker=broker, backend=backend)
        self.workers = [Worker(self.env, f"bench{n}@{os.uname().nodename}",
                               self.folder / f"worker{n}.log", concurrency=1)
                        .start(self.celery) for n in (1, 2)]
        self.processes += self.workers
        self.api = LiveServer(self.env, self.folder / "gunicorn.log").start()
        self.processes.append(self.api)
        self.flower_port = free_port()
        self._flower_log = open(self.folder / "flower.log", "wb")  # noqa: SIM115
        self.flower = subprocess.Popen(
            [str(BIN / "celery"), "-A", "wsgi:celery_app", "flower",
             f"--port={self.flower_port}", "--address=127.0.0.1"],
            env=self.env, cwd=ROOT, stdout=self._flower_log, stderr=subprocess.STDOUT)
        wait_for(self._flower_up, timeout=60, interval=0.3, message="Flower to serve")
        from bench.launch_ceiling import start_servers

        start_servers(self)  # the bare send_task endpoint and an authenticated API
        return self

    def _flower_up(self):
        try:
            return requests.get(f"{self.flower_url}/api/workers", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def _database(self) -> str:
        if self.smoke or self.database_kind == "sqlite":
            return f"sqlite:///{self.folder / 'bench.db'}"
        # PostgreSQL when reachable; otherwise the bench still runs, on SQLite, and says so.
        url, self.database = reachable_database()
        return url or f"sqlite:///{self.folder / 'bench.db'}"

    def settle(self):
        """On PostgreSQL, a CHECKPOINT: each measurement starts with the WAL of the ones
        before it written out, instead of one of them paying for a checkpoint that the
        WAL volume of another started (seen: an endpoint at half its rate in one round)."""
        if self.database is None:
            return
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def pause_workers(self):
        self.celery.control.cancel_consumer("celery", reply=True, timeout=2)

    def resume_workers(self):
        self.celery.control.add_consumer("celery", reply=True, timeout=2)

    def purge(self):
        self.celery.control.purge()

    def api_worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.api.process.pid)],
                             capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self):
        stop_process(getattr(self, "flower", None), 15)
        for process in reversed(self.processes):
            process.stop()
        if self.database:
            drop_database(self.database)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- phases ----------------------------------------------------------------------------

def phase_launch(system: System, seconds: float) -> dict:
    from bench.launch_ceiling import measure

    system.pause_workers()
    try:
        # api, api_auth, flower and bare (bench/launch_ceiling.py), then the raw loop
        results = measure(system, seconds)
        results["raw"] = raw_loop(system.env["CELERY_BROKER_URL"],
                                  system.env["CELERY_RESULT_BACKEND"], seconds)
    finally:
        system.purge()
        system.resume_workers()
    return results


BATCH_SIZE = 1000
BATCH_BODY = json.dumps({"tasks": [{"task_type": "bench.noop", "params": {"n": 1}}]
                         * BATCH_SIZE})


def phase_batch(system: System, batches: int) -> dict:
    """1,000 tasks per POST /tasks/batch, against 1,000 single launches (16 connections)."""
    system.pause_workers()
    session = requests.Session()
    try:
        timings = []
        for _ in range(batches):
            started = time.perf_counter()
            response = session.post(f"{system.api.url}/api/celery/tasks/batch",
                                    data=BATCH_BODY, timeout=120,
                                    headers={"Content-Type": "application/json"})
            timings.append(time.perf_counter() - started)
            assert response.status_code == 202, response.text[:500]
            assert len(response.json()["tasks"]) == BATCH_SIZE
        singles = loadgen(f"{system.api.url}/api/celery/tasks/launch", BATCH_SIZE,
                          method="POST", body=LAUNCH_BODY, connections=16)
    finally:
        system.purge()
        system.resume_workers()
    per_batch = statistics.median(timings)
    return {"batch": {"rps": BATCH_SIZE / per_batch, "ms_per_batch": per_batch * 1000},
            "singles": {"rps": singles["rps"], "errors": singles["errors"]}}


def finished_ids(system: System, count: int) -> list[str]:
    session = requests.Session()
    ids = [session.post(f"{system.api.url}/api/celery/tasks/launch", data=LAUNCH_BODY,
                        headers={"Content-Type": "application/json"}, timeout=10)
           .json()["task_id"] for _ in range(count)]

    def all_done():
        return all(system.celery.backend.get_task_meta(i)["status"] == "SUCCESS" for i in ids)

    wait_for(all_done, timeout=120, interval=0.2, message="the status phase's runs to finish")
    return ids


def phase_status(system: System, ids: list[str], seconds: float) -> dict:
    for task_id in ids[:5]:  # the record has caught up with the backend
        wait_for(lambda t=task_id: requests.get(
            f"{system.api.url}/api/celery/tasks/{t}", timeout=5).json()["status"] == "SUCCESS",
            timeout=30, message="records to be final")
    api = wrk(f"{system.api.url}/", seconds, folder=system.folder,
              paths=[f"/api/celery/tasks/{i}" for i in ids])
    flower = wrk(f"{system.flower_url}/", seconds, folder=system.folder,
                 paths=[f"/api/task/result/{i}" for i in ids])
    return {"api": api, "flower": flower}


def sequential_ms(url: str, count: int) -> dict:
    session = requests.Session()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(url, timeout=30)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    samples.sort()
    return {"p50_ms": statistics.median(samples),
            "p99_ms": samples[int(0.99 * (len(samples) - 1))]}


SPARSE_INTERVAL = 1.5


def sparse_ms(api_url: str, flower_url: str, count: int) -> dict:
    """One caller asking every 1.5 s, to this API and to Flower in turn (same ticks)."""
    session = requests.Session()
    samples: dict[str, list[float]] = {"api": [], "flower": []}
    oldest = 0.0
    for _ in range(count):
        tick = time.perf_counter()
        for key, url in (("api", api_url), ("flower", flower_url)):
            started = time.perf_counter()
            response = session.get(url, timeout=30)
            samples[key].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
            if key == "api":
                oldest = max(oldest, response.json().get("snapshot_age_seconds", 0.0))
        time.sleep(max(0.0, tick + SPARSE_INTERVAL - time.perf_counter()))
    return {key: {"p50_ms": statistics.median(values),
                  "p99_ms": sorted(values)[int(0.99 * (len(values) - 1))]}
            for key, values in samples.items()} | {"oldest_answer_s": oldest}


def phase_stats(system: System, count: int, sparse: int) -> dict:
    # The sparse caller first, from cold: its first call pays what a first call pays.
    paced = sparse_ms(f"{system.api.url}/api/celery/stats",
                      f"{system.flower_url}/api/workers?refresh=1", sparse)
    api = sequential_ms(f"{system.api.url}/api/celery/stats", count)
    flower = sequential_ms(f"{system.flower_url}/api/workers?refresh=1", max(3, count // 5))
    body = requests.get(f"{system.api.url}/api/celery/stats", timeout=10).json()
    assert len(body["workers_online"]) == 2, body.get("workers_online")
    return {"api": api, "flower": flower, "sparse": paced}


def stats_rows(st: dict) -> list[tuple]:
    sparse = st["sparse"]
    return [
        (f"stats p50 vs Flower refresh, one call every {SPARSE_INTERVAL} s",
         f"{sparse['api']['p50_ms']:.1f} vs {sparse['flower']['p50_ms']:.0f} ms (oldest "
         f"answer {sparse['oldest_answer_s']:.2f} s)",
         sparse["api"]["p50_ms"] / sparse["flower"]["p50_ms"], "<= 0.1x",
         sparse["api"]["p50_ms"] <= 0.1 * sparse["flower"]["p50_ms"]),
        ("stats p50 vs Flower refresh, back to back", f"{st['api']['p50_ms']:.1f} vs "
         f"{st['flower']['p50_ms']:.0f} ms", st["api"]["p50_ms"] / st["flower"]["p50_ms"],
         "<= 0.1x", st["api"]["p50_ms"] <= 0.1 * st["flower"]["p50_ms"]),
    ]


def stats_report(st: dict) -> str:
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the stats phase "
             "alone (`bench/compare.py --only stats`); private redis-server, two `-c 1` "
             "workers, the API under gunicorn.conf.py (2 workers x 4 threads), Flower 2.", "",
             "| measure | result | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    for name, value, ratio, target, met in stats_rows(st):
        lines.append(f"| {name} | {value} | {ratio:.3f}x | {target} | "
                     f"{'yes' if met else '**no**'} |")
    lines += ["", "| | p50 ms | p99 ms |", "| --- | --- | --- |"]
    for label, sample in (("API, every 1.5 s", st["sparse"]["api"]),
                          ("Flower refresh, every 1.5 s", st["sparse"]["flower"]),
                          ("API, back to back", st["api"]),
                          ("Flower refresh, back to back", st["flower"])):
        lines.append(f"| {label} | {sample['p50_ms']:.2f} | {sample['p99_ms']:.2f} |")
    return "\n".join(lines)


def phase_e2e(system: System, count: int) -> dict:
    session = requests.Session()
    backend = system.celery.backend

    def poll(check):
        while not check():
            time.sleep(0.002)

    api, raw = [], []
    for _ in range(count):
        started = time.perf_counter()
        task_id = session.post(f"{system.api.url}/api/celery/tasks/launch", data=LAUNCH_BODY,
                               headers={"Content-Type": "application/json"},
                               timeout=10).json()["task_id"]
        poll(lambda t=task_id: session.get(f"{system.api.url}/api/celery/tasks/{t}",
                                           timeout=10).json()["status"] == "SUCCESS")
        api.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        result = system.celery.send_task("bench.noop", kwargs={"n": 1})
        poll(lambda r=result: backend.get_task_meta(r.id)["status"] == "SUCCESS")
        raw.append((time.perf_counter() - started) * 1000)
    return {"api": {"p50_ms": statistics.median(api)}, "raw": {"p50_ms": statistics.median(raw)}}


def phase_memory(system: System, launches: int) -> dict:
    pids = system.api_worker_pids()
    # Warm every worker first, so the comparison is not with a process that never ran.
    loadgen(f"{system.api.url}/api/celery/tasks/launch", 400, method="POST", body=LAUNCH_BODY,
            connections=8)
    system.pause_workers()
    try:
        before = {pid: rss_kb(pid) for pid in pids}
        result = loadgen(f"{system.api.url}/api/celery/tasks/launch", launches, method="POST",
                         body=LAUNCH_BODY, connections=8)
        after = {pid: rss_kb(pid) for pid in pids}
    finally:
        system.purge()
        system.resume_workers()
    growth = max((after[p] - before[p]) / before[p] for p in pids if before[p])
    return {"before_kb": before, "after_kb": after, "growth": growth,
            "errors": result["errors"], "launches": result["requests"]}


# -- report -----------------------------------------------------------------------------

def median_of(rounds: list[dict], *keys) -> float:
    values = []
    for r in rounds:
        value = r
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def report(results: dict, system: System, args) -> tuple[str, bool]:
    L, S, B = results["launch"], results["status"], results["batch"]
    st, e2e, mem = results["stats"], results["e2e"], results["memory"]
    api_l, flower_l, raw_l = (median_of(L, k, "rps") for k in ("api", "flower", "raw"))
    api_s, flower_s = (median_of(S, k, "rps") for k in ("api", "flower"))
    overhead = e2e["api"]["p50_ms"] - e2e["raw"]["p50_ms"]
    batch_rps = median_of(B, "batch", "rps")
    from bench.launch_ceiling import rows as launch_rows

    rows = [
        *launch_rows(L),  # vs Flower, vs the bare send_task endpoint, with auth
        ("launch vs raw send_task loop", f"{api_l:,.0f} vs {raw_l:,.0f} /s",
         api_l / raw_l, ">= 0.5x", api_l >= 0.5 * raw_l),
        ("status vs Flower", f"{api_s:,.0f} vs {flower_s:,.0f} req/s",
         api_s / flower_s, ">= 2x", api_s >= 2 * flower_s),
        *stats_rows(st),
        ("end to end p50, API vs raw", f"{e2e['api']['p50_ms']:.1f} vs "
         f"{e2e['raw']['p50_ms']:.1f} ms", None, "overhead <= 10 ms", overhead <= 10),
        ("API worker RSS after 20,000 launches", f"+{mem['growth']:.1%}", None, "<= +20%",
         mem["growth"] <= 0.20),
        ("batch of 1,000 vs raw send_task loop",
         f"{batch_rps:,.0f} vs {raw_l:,.0f} tasks/s ({median_of(B, 'batch', 'ms_per_batch'):,.0f}"
         f" ms per batch; 1,000 single launches: {median_of(B, 'singles', 'rps'):,.0f}/s)",
         batch_rps / raw_l, ">= 3x", batch_rps >= 3 * raw_l),
    ]
    db = "PostgreSQL" if system.database else "SQLite"
    load = "wrk -t2 -c16" if USE_WRK else "bench/loadgen.py, 16 connections"
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.rounds} round(s) "
        f"of {args.seconds:.0f} s per load phase, {load}; private redis-server (broker and "
        f"results), two `-c 1` workers, the API under gunicorn.conf.py "
        f"(2 workers x 4 threads) on {db}, Flower 2 with FLOWER_UNAUTHENTICATED_API.",
        "Launch phases run with the workers' consumers paused (the queue is purged after),",
        "so all three measure publishing, not execution.", "",
        "| measure | result | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    all_met = True
    for name, value, ratio, target, met in rows:
        ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
        met_text = "n/a" if met is None else ("yes" if met else "**no**")
        all_met = all_met and met is not False
        lines.append(f"| {name} | {value} | {ratio_text} | {target} | {met_text} |")
    lines += ["", "Latency (median of rounds):", "",
              "| | p50 ms | p99 ms | errors |", "| --- | --- | --- | --- |"]
    for label, runs, key in (("launch, API", L, "api"), ("launch, API with auth", L, "api_auth"),
                             ("launch, bare send_task endpoint", L, "bare"),
                             ("launch, Flower", L, "flower"),
                             ("launch, raw loop (per publish)", L, "raw"),
                             ("status, API", S, "api"), ("status, Flower", S, "flower")):
        lines.append(f"| {label} | {median_of(runs, key, 'p50_ms'):.2f} | "
                     f"{median_of(runs, key, 'p99_ms'):.2f} | "
                     f"{sum(r[key]['errors'] for r in runs)} |")
    lines += ["", f"Memory: gunicorn worker RSS (kB) before {mem['before_kb']}, after "
              f"{mem['after_kb']} ({mem['launches']:,} launches, {mem['errors']} errors)."]
    return "\n".join(lines), all_met


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--memory-launches", type=int, default=20_000)
    parser.add_argument("--smoke", action="store_true",
                        help="every phase, briefly, no targets: the harness works")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when installed, else bench/loadgen.py")
    parser.add_argument("--only", choices=("stats",),
                        help="run this phase alone (a loaded machine, or a quick look)")
    args = parser.parse_args()
    global USE_WRK
    if args.loadgen == "python":
        USE_WRK = False
    elif args.loadgen == "wrk" and not USE_WRK:
        parser.error("wrk is not installed (apt-get install wrk)")
    if args.smoke:
        args.rounds, args.seconds, args.memory_launches = 1, 1, 300
    folder = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    system = System(folder, smoke=args.smoke)
    try:
        system.start()
        if args.only == "stats":
            text = stats_report(phase_stats(system, 10 if args.smoke else 60,
                                            4 if args.smoke else 40))
            print(text)
            if args.write and not args.smoke:
                write_section("compare-stats",
                              "## Stats alone: this API against Flower's refresh\n\n" + text)
            return 0
        results = {"launch": [], "status": [], "batch": []}
        ids = finished_ids(system, 40 if args.smoke else 300)
        for _ in range(args.rounds):
            results["launch"].append(phase_launch(system, args.seconds))
            results["status"].append(phase_status(system, ids, args.seconds))
            results["batch"].append(phase_batch(system, 1 if args.smoke else 5))
        results["stats"] = phase_stats(system, 10 if args.smoke else 60,
                                       4 if args.smoke else 40)
        results["e2e"] = phase_e2e(system, 10 if args.smoke else 100)
        results["memory"] = phase_memory(system, args.memory_launches)
        text, all_met = report(results, system, args)
    finally:
        system.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(text)
    if args.write and not args.smoke:
        write_section("compare", "## This API against Flower and raw Celery\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
