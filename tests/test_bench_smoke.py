"""The benchmark harness runs end to end (briefly, no targets), so it never rots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, optional_component

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("loadgen", ["auto", "python"])
def test_compare_bench_smoke_run(loadgen):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--smoke",
                           "--loadgen", loadgen],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in ("launch vs Flower", "launch vs raw send_task loop", "status vs Flower",
                "stats p50 vs Flower refresh", "end to end p50", "API worker RSS"):
        assert f"| {row}" in done.stdout, done.stdout
    assert "| launch, API |" in done.stdout


def test_history_bench_smoke_run():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "history.py"), "--rows", "2000",
                           "--repeat", "3", "--launches", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "connection" in done.stderr.lower() and "5432" in done.stderr:
        optional_component("PostgreSQL", "the history benchmark needs it")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| first page, no filter |" in done.stdout
    assert "| PostgreSQL | 8 |" in done.stdout


def test_waiting_bench_smoke_run():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "waiting.py"), "--waiters", "20",
                           "--runs", "3", "--probes", "5", "--repeats", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ("| waiters parked at once, 2 times | 20 each time: 40 answered of 40 "
            "(0 refused with 503) |") in done.stdout
    assert "| delay, one waiter per run (3 runs)" in done.stdout
