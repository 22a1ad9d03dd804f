"""A TypeScript client, as other teams build one: openapi-typescript (default options)
generates types from the live /api/openapi.json, tests/ts_client/flow.ts calls the API
with openapi-fetch through them (catalog, launch acme.add, poll to SUCCESS, typed
progress, history), `tsc --strict --noEmit` type-checks it and node runs it against a
gunicorn server that requires API keys.

Node.js and npm are needed (Debian's `nodejs` and `npm`; .ci/run installs them): without
them the test is skipped, and fails under CI=true. The npm packages are the exact
versions of tests/ts_client/package-lock.json, installed with `npm ci` into a cache
folder (CELERY_API_TS_CACHE, default .venv/ts-client/<lock hash>) once, and reused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, LiveServer, create_key, optional_component

pytestmark = pytest.mark.integration

PROJECT = ROOT / "tests" / "ts_client"
SOURCES = ("package.json", "tsconfig.json", "flow.ts", "wrong_status.ts", "defaults.ts")


def run(args, cwd, timeout=300, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def output(done) -> str:
    return f"$ {' '.join(map(str, done.args))}\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/ts_client's locked packages, installed once per lock file."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        optional_component("Node.js", "node and npm are not on PATH (Debian: apt-get "
                                      "install nodejs npm; .ci/run does)")
    lock = (PROJECT / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (PROJECT / "package.json").read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("CELERY_API_TS_CACHE") or ROOT / ".venv" / "ts-client")
    folder = base / digest
    marker = folder / ".installed"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / "package.json", folder)
        (folder / "package-lock.json").write_bytes(lock)
        done = run([npm, "ci", "--prefer-offline", "--no-audit", "--no-fund",
                    "--cache", str(base / "npm-cache")], cwd=folder, timeout=600)
        if done.returncode != 0:
            optional_component("the npm registry", f"npm ci failed:\n{output(done)}")
        marker.write_text(digest)
    return folder / "node_modules"


@pytest.fixture(scope="module")
def live(stack, tmp_path_factory):
    """gunicorn with keys required, and a key with the scopes the flow needs."""
    key = create_key(stack.app, "ts-client", "read", "launch")
    folder = tmp_path_factory.mktemp("ts-server")
    server = LiveServer(stack.env(), folder / "gunicorn.log",
                        CELERY_API_AUTH="required").start()
    yield server, key
    server.stop()


def project(tmp_path: Path, node_modules: Path, spec_url: str, *options: str) -> Path:
    """A folder with the sources, the packages and schema.ts generated from ``spec_url``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        shutil.copy(PROJECT / name, tmp_path)
    (tmp_path / "node_modules").symlink_to(node_modules, target_is_directory=True)
    done = run([str(node_modules / ".bin" / "openapi-typescript"), spec_url, *options,
                "--output", "schema.ts"], cwd=tmp_path)
    assert done.returncode == 0, output(done)
    assert "⚠" not in done.stdout + done.stderr, output(done)
    return tmp_path


def tsc(folder: Path, *args: str):
    return run([str(folder / "node_modules" / ".bin" / "tsc"), *args], cwd=folder)


@pytest.mark.parametrize("stack", [("redis", "sqlite")], indirect=True, ids=["redis-sqlite"])
def test_typescript_client_runs_the_readme_flow(stack, live, node_modules, tmp_path):
    server, key = live
    folder = project(tmp_path, node_modules, f"{server.url}/api/openapi.json")
    schema = (folder / "schema.ts").read_text()
    # Typed, not `unknown`: progress is an object or null; status a union of the states.
    assert 'progress: components["schemas"]["Progress"] | null;' in schema or (
        "progress: {" in schema), schema
    assert '"PENDING" | "RECEIVED" | "STARTED" | "PROGRESS"' in schema

    checked = tsc(folder, "-p", "tsconfig.json", "--strict", "--noEmit")
    assert checked.returncode == 0, output(checked)
    built = tsc(folder, "-p", "tsconfig.json")
    assert built.returncode == 0, output(built)
    env = dict(os.environ, CELERY_API_URL=server.url, CELERY_API_KEY=key)
    ran = run(["node", str(folder / "build" / "flow.js")], cwd=folder, timeout=180, env=env)
    assert ran.returncode == 0, output(ran)
    report = json.loads(ran.stdout.strip().splitlines()[-1])

    assert {"acme.add", "sii.sync_documents"} <= set(report["task_types"])
    assert report["status"] == "SUCCESS" and report["result"] == {"sum": 5}
    assert report["status_url"] == f"/api/celery/tasks/{report['task_id']}"
    assert report["progress"] == "no progress reported"
    assert report["seen"][-1].startswith("SUCCESS")
    assert report["sync_progress"][-1].startswith("SUCCESS")
    assert {"task_id": report["task_id"], "status": "SUCCESS"} in report["history"]
    assert report["problem"]["status"] == 404
    assert report["problem"]["detail"].startswith("No task with id")
    assert report["streamed_status"] == "SUCCESS"  # the event stream, read as its text


@pytest.mark.parametrize("stack", [("redis", "sqlite")], indirect=True, ids=["redis-sqlite"])
def test_typescript_types_refuse_what_the_server_never_sends(stack, live, node_modules,
                                                             tmp_path):
    server, _key = live
    url = f"{server.url}/api/openapi.json"
    folder = project(tmp_path / "default", node_modules, url)
    wrong = tsc(folder, "--strict", "--noEmit", "--module", "nodenext", "--moduleResolution",
                "nodenext", "--skipLibCheck", "wrong_status.ts")
    assert wrong.returncode != 0 and "TS2367" in wrong.stdout, output(wrong)
    assert '"success"' in wrong.stdout

    # openapi-typescript 7 makes a field with a default required (defaultNonNullable):
    # with its default options a launch must send every defaulted param ...
    defaults = ("--strict", "--noEmit", "--module", "nodenext", "--moduleResolution",
                "nodenext", "--skipLibCheck", "defaults.ts")
    strict = tsc(folder, *defaults)
    assert strict.returncode != 0 and "month_offset" in strict.stdout, output(strict)
    # ... and with the README's setting it may leave them out; flow.ts compiles either way.
    relaxed = project(tmp_path / "relaxed", node_modules, url, "--default-non-nullable",
                      "false")
    done = tsc(relaxed, *defaults)
    assert done.returncode == 0, output(done)
    done = tsc(relaxed, "-p", "tsconfig.json", "--strict", "--noEmit")
    assert done.returncode == 0, output(done)
