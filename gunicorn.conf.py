"""gunicorn settings for celery-api, read from the environment (see the README table)."""

import os
import shutil
import tempfile

# Metrics of every worker process are summed at /metrics (prometheus_client's
# multiprocess mode): each process writes its samples to files in this folder.
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="celery-api-metrics-")

bind = os.environ.get("GUNICORN_BIND") or f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gthread, with the connection handling of EdgeThreadWorker (celery_api/fences/gunicorn.py):
# a connection holds a thread only once its request head is complete (README "Slow and
# idle clients"), and a client waiting on a run holds none (README "Waiting for a run").
worker_class = "celery_api.fences.gunicorn.EdgeThreadWorker"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# Open connections per worker process (idle ones cost a file descriptor, not a thread).
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "10"))
keepalive = 5
# A request head (request line and headers) must be complete this many seconds after
# its first byte, and a new connection must send that byte within it too: else closed.
# (GUNICORN_HEADER_TIMEOUT, read by celery_api/fences/gunicorn.py; default 10.)
# The same limits as nginx's large_client_header_buffers (4 x 8k, deploy/nginx.conf):
# a longer request line is a 414, a longer header line or more than 100 headers a 431,
# each answered as problem+json; a head over 64 KB in all is a 431 without being parsed.
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 100
accesslog = "-" if os.environ.get("GUNICORN_ACCESS_LOG", "0") in ("1", "true") else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn 27 opens a control socket under ~/.gunicorn by default: not wanted here.
control_socket_disable = True
# Published URLs (Location, OpenAPI servers) follow X-Forwarded-* only from these peers.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def on_starting(server):
    """Start from an empty metrics folder: samples of an earlier run must not count."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def when_ready(server):
    """Refuse to serve when CELERY_API_AUTH is required (the default) and the database
    has no active API key; with CELERY_API_AUTH=off, log a warning (README,
    Authentication). gunicorn exits 1 with the message."""
    from celery_api.auth import check_before_serving

    try:
        check_before_serving(server.log)
    except RuntimeError:
        on_exit(server)
        raise


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this config made (one given by the operator stays)."""
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
