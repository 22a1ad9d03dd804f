"""A small HTTP load generator (keep-alive connections in threads), for where wrk is not
installed and for fixed request counts. Run in its own process by the benchmark."""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit


def run(url: str, method: str, body: bytes | None, total: int, connections: int,
        paths: list[str] | None = None, extra_headers: dict | None = None) -> dict:
    parts = urlsplit(url)
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(total))

    def worker():
        nonlocal errors
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        mine, failed = [], 0
        headers = {"Content-Type": "application/json"} if body else {}
        headers.update(extra_headers or {})
        for i in counter:
            path = paths[i % len(paths)] if paths else parts.path
            started = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            errors += failed

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies), "errors": errors, "seconds": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else None,
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    body = spec["body"].encode() if spec.get("body") else None
    print(json.dumps(run(spec["url"], spec["method"], body, spec["total"],
                         spec["connections"], spec.get("paths"), spec.get("headers"))))
