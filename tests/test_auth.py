"""API keys and scopes (README, Authentication): every operation of the OpenAPI document
against every kind of caller, the keys CLI, who launched and revoked each run, and
gunicorn's refusal to serve without a key."""

from __future__ import annotations

import re
import subprocess
import uuid
from types import SimpleNamespace

import pytest
import requests
import sqlalchemy as sa
from celery.exceptions import Ignore

from celery_api import auth, create_app
from celery_api.extensions import db
from celery_api.models import ApiKey, TaskRun
from celery_api.services import fanout, keys
from celery_api.services.keys import SCOPES
from tests.support import (
    BIN,
    COMPANY,
    PROBLEM,
    ROOT,
    LiveServer,
    build_app,
    create_key,
    free_port,
    make_config,
    service_env,
    stored_run,
    wait_for,
)

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# Operations of the document that are open on purpose. /readyz answers its bare status
# to anyone and its details only with `read` (test_readyz_details_need_read).
OPEN = {("get", "/healthz"), ("get", "/readyz")}
# The SPEC's scopes of the operations there are today; a new one needs a scope, any.
EXPECTED_SCOPES = {
    "listTasks": "read", "getTaskStatus": "read", "listHistory": "read", "getStats": "read",
    "getBatch": "read", "getMetrics": "read", "launchTask": "launch",
    "launchBatch": "launch", "retryTask": "launch", "revokeTask": "control",
    "revokeBatch": "control",
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory, redis_server):
    """An app with AUTH=required (the product's default), no worker, and its keys."""
    folder = tmp_path_factory.mktemp("auth")
    config = make_config(folder, redis_server.url.replace("/0", "/10"), AUTH="required")
    app = build_app(config)
    made = {"all": create_key(app, "all", *SCOPES)}
    for scope in SCOPES:
        made[f"lacks-{scope}"] = create_key(app, f"lacks-{scope}",
                                            *[s for s in SCOPES if s != scope])
    made["revoked"] = create_key(app, "revoked", *SCOPES)
    with app.app_context():
        keys.revoke("revoked")
    return SimpleNamespace(app=app, config=config, keys=made, client=app.test_client())


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def call(client, method, path, operation, headers=None):
    """The operation with a random UUID in each path parameter and a minimal body."""
    url = re.sub(r"\{[^}]+\}", lambda _m: str(uuid.uuid4()), path)
    body = {"json": {}} if "requestBody" in operation else {}
    return client.open(url, method=method.upper(), headers=headers or {}, **body)


def test_the_document_declares_a_scope_for_every_operation(secured):
    spec = secured.client.get("/api/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        **spec["components"]["securitySchemes"]["bearerAuth"], "type": "http",
        "scheme": "bearer"}
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    seen = {}
    for method, path, operation in operations(spec):
        if (method, path) in OPEN:
            continue
        scope = operation.get("x-required-scope")
        assert scope in SCOPES, f"{method.upper()} {path} declares no scope"
        assert operation["security"] == [{"bearerAuth": []}], (method, path)
        assert f"scope `{scope}`" in operation["description"], (method, path)
        assert operation["responses"]["401"] == {"$ref": "#/components/responses/AuthRequired"}
        assert operation["responses"]["403"] == {"$ref": "#/components/responses/ScopeRequired"}
        seen[operation["operationId"]] = scope
    assert seen.items() >= EXPECTED_SCOPES.items()
    for name in ("AuthRequired", "ScopeRequired"):
        response = spec["components"]["responses"][name]
        assert "WWW-Authenticate" in response["headers"]
        assert list(response["content"]) == [PROBLEM]


@pytest.mark.parametrize("caller", ["no key", "malformed key", "wrong secret", "unknown id",
                                    "revoked key", "key without the scope",
                                    "key with the scope"])
def test_every_operation_against_every_caller(secured, caller):
    """Derived from the document: an operation added without a scope fails here."""
    client = secured.client
    spec = client.get("/api/openapi.json").get_json()
    valid = secured.keys["all"]
    wrong_secret = valid[:-64] + ("0" if valid[-1] != "0" else "1") * 64
    unknown_id = f"cak_{'f' * 12}_{valid[-64:]}"
    failures, checked = [], 0
    for method, path, operation in operations(spec):
        if (method, path) in OPEN:
            answer = call(client, method, path, operation)
            if answer.status_code in (401, 403):
                failures.append(f"{method.upper()} {path} (open) answered {answer.status_code}")
            continue
        scope = operation["x-required-scope"]
        headers = {
            "no key": {}, "malformed key": bearer("not-a-key"),
            "wrong secret": bearer(wrong_secret), "unknown id": bearer(unknown_id),
            "revoked key": bearer(secured.keys["revoked"]),
            "key without the scope": bearer(secured.keys[f"lacks-{scope}"]),
            "key with the scope": bearer(valid),
        }[caller]
        answer = call(client, method, path, operation, headers)
        checked += 1
        name = f"{method.upper()} {path} ({scope})"
        challenge = answer.headers.get("WWW-Authenticate", "")
        if caller == "key with the scope":
            if answer.status_code in (401, 403):
                failures.append(f"{name}: {answer.status_code} with the scope")
            continue
        expected = 403 if caller == "key without the scope" else 401
        if answer.status_code != expected or answer.mimetype != PROBLEM:
            failures.append(f"{name}: {answer.status_code} {answer.mimetype}, not {expected}")
            continue
        if not answer.get_json().get("detail") or not challenge.startswith("Bearer "):
            failures.append(f"{name}: no detail or no Bearer challenge ({challenge!r})")
        elif caller == "no key" and "error=" in challenge:
            failures.append(f"{name}: error in the challenge without a key: {challenge}")
        elif expected == 401 and caller != "no key" and 'error="invalid_token"' not in challenge:
            failures.append(f"{name}: {challenge!r} lacks invalid_token")
        elif expected == 403 and ('error="insufficient_scope"' not in challenge
                                  or f'scope="{scope}"' not in challenge):
            failures.append(f"{name}: {challenge!r} does not name the scope")
    assert checked >= len(EXPECTED_SCOPES)
    assert not failures, "\n".join(failures)


def test_details_of_refusals(secured):
    client = secured.client
    revoked = client.get("/api/celery/tasks", headers=bearer(secured.keys["revoked"]))
    assert revoked.status_code == 401 and "'revoked' was revoked" in revoked.get_json()["detail"]
    lacking = client.post("/api/celery/tasks/launch", json={},
                          headers=bearer(secured.keys["lacks-launch"]))
    assert lacking.status_code == 403
    assert "'lacks-launch' lacks the scope launch" in lacking.get_json()["detail"]
    basic = client.get("/api/celery/tasks", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401 and 'error="invalid_token"' in basic.headers[
        "WWW-Authenticate"]
    lower = client.get("/api/celery/tasks",
                       headers={"Authorization": f"bearer {secured.keys['all']}"})
    assert lower.status_code == 200


def test_documents_and_health_stay_open(secured):
    client = secured.client
    assert client.get("/api/openapi.json").status_code == 200
    assert client.get("/api/docs/").status_code == 200
    assert client.get("/healthz").get_json() == {"status": "alive"}
    # A route that does not exist is a 404, as without authentication.
    assert client.get("/api/celery/nothing-here").status_code == 404


def test_readyz_details_need_read(secured):
    client = secured.client
    names = {"database", "broker", "result_backend"}
    bare = client.get("/readyz")
    assert bare.status_code == 200, bare.get_json()
    # Open: status and latency of each dependency, never what or where it is.
    assert set(bare.get_json()["checks"]) == names
    assert all("detail" not in check for check in bare.get_json()["checks"].values())
    detailed = client.get("/readyz", headers=bearer(secured.keys["lacks-launch"])).get_json()
    assert set(detailed["checks"]) == names
    assert all("detail" in check for check in detailed["checks"].values())
    no_read = client.get("/readyz", headers=bearer(secured.keys["lacks-read"])).get_json()
    assert all("detail" not in check for check in no_read["checks"].values())
    assert client.get("/readyz", headers=bearer("cak_bad")).status_code == 401


def test_an_undeclared_view_stops_the_app(tmp_path):
    from flask.views import MethodView

    from celery_api.smorest import Blueprint

    app = create_app(make_config(tmp_path, "redis://127.0.0.1:1/0", AUTH="required"))
    assert auth.undeclared(app) == []
    blp = Blueprint("forgotten", __name__, url_prefix="/api/celery")

    @blp.route("/forgotten")
    class Forgotten(MethodView):
        def get(self):
            return {}

    app.extensions["celery_api.api"].register_blueprint(blp)
    assert auth.undeclared(app) == ["forgotten.Forgotten GET"]
    with pytest.raises(RuntimeError, match="declare no scope.*forgotten.Forgotten GET"):
        auth.init_app(app)
    # And at run time it fails closed: it needs the widest scope.
    assert app.test_client().get("/api/celery/forgotten").status_code == 401


def test_required_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CELERY_API_AUTH", raising=False)
    config = make_config(tmp_path, "redis://127.0.0.1:1/0")
    del config["AUTH"]
    app = create_app(config)
    assert app.config["AUTH"] == "required"
    assert app.test_client().get("/api/celery/tasks").status_code == 401
    monkeypatch.setenv("CELERY_API_AUTH", "off")
    assert create_app(config).config["AUTH"] == "off"


@pytest.mark.parametrize("value", ["yes", "false", "0", "disabled"])
def test_other_auth_values_refuse_to_start(tmp_path, value):
    with pytest.raises(ValueError, match="CELERY_API_AUTH must be 'required' or 'off'"):
        create_app(make_config(tmp_path, "redis://127.0.0.1:1/0", AUTH=value))
    assert auth.auth_mode(None) == auth.auth_mode("") == "required"
    assert auth.auth_mode(" OFF ") == "off"


# Who launched and who revoked.

def test_runs_record_the_key_that_launched_and_revoked_them(secured):
    app, client = secured.app, secured.client
    launcher = create_key(app, "launcher", "launch", "read")
    controller = create_key(app, "controller", "control")
    launched = client.post("/api/celery/tasks/launch", headers=bearer(launcher), json={
        "task_type": "sii.sync_documents", "params": {"company_id": COMPANY},
        "countdown": 600})
    assert launched.status_code == 202, launched.get_data(as_text=True)
    task_id = launched.get_json()["task_id"]
    batch = client.post("/api/celery/tasks/batch", headers=bearer(launcher), json={"tasks": [
        {"task_type": "sii.sync_f29", "params": {"company_id": COMPANY}, "countdown": 600}
        for _ in range(2)]})
    assert batch.status_code == 202, batch.get_data(as_text=True)
    batch_id = batch.get_json()["batch_id"]
    failed = stored_run(app, "FAILURE")
    retried = client.post(f"/api/celery/tasks/{failed}/retry", headers=bearer(launcher))
    assert retried.status_code == 202, retried.get_data(as_text=True)

    revoked = client.delete(f"/api/celery/tasks/{task_id}", headers=bearer(controller))
    assert revoked.status_code == 200 and revoked.get_json()["status"] == "REVOKED"
    batch_revoked = client.delete(f"/api/celery/batches/{batch_id}",
                                  headers=bearer(controller))
    assert batch_revoked.status_code == 200, batch_revoked.get_data(as_text=True)

    status = client.get(f"/api/celery/tasks/{task_id}", headers=bearer(launcher)).get_json()
    assert (status["launched_by"], status["revoked_by"]) == ("launcher", "controller")

    def history(**params):
        answer = client.get("/api/celery/history", query_string=params,
                            headers=bearer(launcher))
        assert answer.status_code == 200, answer.get_data(as_text=True)
        return answer.get_json()["items"]

    mine = {row["task_id"]: row for row in history(launched_by="launcher")}
    assert set(mine) == {task_id, retried.get_json()["task_id"],
                         *[t["task_id"] for t in batch.get_json()["tasks"]]}
    assert {row["revoked_by"] for row in mine.values()} == {"controller", None}
    stopped = history(revoked_by="controller")
    assert {row["task_id"] for row in stopped} == {
        task_id, *[t["task_id"] for t in batch.get_json()["tasks"]]}
    assert history(launched_by="nobody") == []


def test_with_auth_off_nothing_is_recorded(client):
    launched = client.post("/api/celery/tasks/launch", json={
        "task_type": "sii.sync_documents", "params": {"company_id": COMPANY},
        "countdown": 600})
    assert launched.status_code == 202
    task_id = launched.get_json()["task_id"]
    assert client.delete(f"/api/celery/tasks/{task_id}").status_code == 200
    status = client.get(f"/api/celery/tasks/{task_id}").get_json()
    assert status["launched_by"] is None and status["revoked_by"] is None


def test_fan_out_children_inherit_the_parents_key(secured):
    app = secured.app
    parent_id = stored_run(app, "STARTED", launched_by="nightly-job")
    task = SimpleNamespace(request=SimpleNamespace(id=parent_id, root_id=parent_id),
                           update_state=lambda **_: None)
    with app.app_context(), pytest.raises(Ignore):
        fanout.fan_out(task, "sii.sync_documents", [{"company_id": COMPANY, "months": 1}],
                       total=1, skipped=0)
    with app.app_context():
        children = db.session.execute(sa.select(TaskRun.launched_by).where(
            TaskRun.parent_id == parent_id)).scalars().all()
    assert children == ["nightly-job"]


# The keys themselves.

def test_keys_are_stored_hashed_and_last_use_is_recorded_sparingly(secured):
    app, client = secured.app, secured.client
    key = create_key(app, "sparing", "read")
    assert re.fullmatch(r"cak_[0-9a-f]{12}_[0-9a-f]{64}", key)
    with app.app_context():
        row = db.session.execute(sa.select(ApiKey).where(ApiKey.name == "sparing")).scalar_one()
        assert key not in (row.secret_hash, row.id) and row.secret_hash == keys.digest(key)
        assert row.last_used_at is None
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 200

    def last_used():
        with app.app_context():
            value = db.session.execute(sa.select(ApiKey.last_used_at).where(
                ApiKey.name == "sparing")).scalar_one()
            db.session.rollback()
            return value

    first = last_used()
    assert first is not None
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 200
    assert last_used() == first  # not written again within the minute


def test_a_key_revoked_here_stops_at_once(secured):
    app, client = secured.app, secured.client
    key = create_key(app, "short-lived", "read")
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 200  # cached
    with app.app_context():
        keys.revoke("short-lived")
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 401


def test_keys_cli(secured):
    app, client = secured.app, secured.client
    runner = app.test_cli_runner()
    made = runner.invoke(args=["keys", "create", "cli-made", "--scope", "read",
                               "--scope", "launch"])
    assert made.exit_code == 0, made.output
    key = made.output.strip().splitlines()[-1]
    assert re.fullmatch(r"cak_[0-9a-f]{12}_[0-9a-f]{64}", key)
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 200
    assert client.get("/api/celery/stats", headers=bearer(key)).status_code != 403

    listed = runner.invoke(args=["keys", "list"])
    assert listed.exit_code == 0 and key not in listed.output and key[-64:] not in listed.output
    line = next(row for row in listed.output.splitlines() if row.startswith("cli-made\t"))
    assert "\tread,launch\t" in line and line.endswith("\tactive")

    again = runner.invoke(args=["keys", "create", "cli-made", "--scope", "read"])
    assert again.exit_code != 0 and "exists already" in again.output
    for args in (["keys", "create", "no-scope"],
                 ["keys", "create", "bad-scope", "--scope", "root"],
                 ["keys", "create", "bad name!", "--scope", "read"]):
        refused = runner.invoke(args=args)
        assert refused.exit_code != 0, (args, refused.output)
        assert "cak_" not in refused.output

    revoked = runner.invoke(args=["keys", "revoke", "cli-made"])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert client.get("/api/celery/tasks", headers=bearer(key)).status_code == 401
    listed = runner.invoke(args=["keys", "list"])
    line = next(row for row in listed.output.splitlines() if row.startswith("cli-made\t"))
    assert "\trevoked " in line
    unknown = runner.invoke(args=["keys", "revoke", "never-made"])
    assert unknown.exit_code != 0 and "No API key is named 'never-made'" in unknown.output


def test_keys_on_a_database_never_migrated_say_to_migrate(tmp_path):
    """A new INSTANCE_PATH without ``make migrate``: a message naming the database and
    the command, exit 1 (before: an 82-line traceback ending in 'no such table')."""
    env = dict(service_env({"CELERY": {"broker_url": "memory://", "result_backend": "cache+memory://"},
                            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/new.db",
                            "INSTANCE_PATH": tmp_path}), CELERY_API_AUTH="required")
    for args in (["create", "first", "--scope", "read"], ["list"], ["revoke", "first"]):
        done = subprocess.run([str(BIN / "flask"), "--app", "wsgi", "keys", *args], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "has no api_keys table" in done.stderr and "make migrate" in done.stderr
        assert "Traceback" not in done.stderr and str(tmp_path) in done.stderr


def test_keys_create_in_a_real_process_prints_a_working_key(secured):
    env = service_env(secured.config)
    env.pop("CELERY_API_AUTH")  # the default, required: the CLI needs no key
    done = subprocess.run([str(BIN / "flask"), "--app", "wsgi", "keys", "create", "from-shell",
                           "--scope", "read"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    key = done.stdout.splitlines()[-1]
    assert re.fullmatch(r"cak_[0-9a-f]{12}_[0-9a-f]{64}", key), done.stdout
    assert key not in done.stderr  # logs never carry it
    assert secured.client.get("/api/celery/history", headers=bearer(key)).status_code == 200
    assert secured.client.post("/api/celery/tasks/launch", json={},
                               headers=bearer(key)).status_code == 403


# make serve: gunicorn with gunicorn.conf.py.

def gunicorn(env: dict, log_path) -> subprocess.Popen:
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            env=dict(env, PORT=str(free_port())), cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT)


@pytest.fixture
def serving(tmp_path, redis_server):
    config = make_config(tmp_path, redis_server.url.replace("/0", "/10"))
    app = build_app(config)
    env = service_env(config)
    env.pop("CELERY_API_AUTH")
    return SimpleNamespace(app=app, env=env, folder=tmp_path)


def test_make_serve_refuses_to_start_without_a_key(serving):
    log_path = serving.folder / "refused.log"
    process = gunicorn(serving.env, log_path)
    try:
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert code != 0, output
    assert "flask --app wsgi keys create" in output and "CELERY_API_AUTH=off" in output
    assert "Booting worker" not in output

    process = gunicorn(dict(serving.env, CELERY_API_AUTH="sometimes"), log_path)
    assert process.wait(timeout=60) != 0
    assert "CELERY_API_AUTH must be 'required' or 'off', got 'sometimes'" in log_path.read_text()


def test_make_serve_with_auth_off_starts_and_warns(serving):
    api = LiveServer(serving.env, serving.folder / "off.log", CELERY_API_AUTH="off").start()
    try:
        assert requests.get(f"{api.url}/api/celery/tasks", timeout=5).status_code == 200
    finally:
        api.stop()
    output = (serving.folder / "off.log").read_text()
    assert "[WARNING]" in output and "CELERY_API_AUTH=off: authentication is disabled" in output


def test_make_serve_with_a_key_serves_and_revokes_within_the_cache_time(serving):
    key = create_key(serving.app, "ops", *SCOPES)
    api = LiveServer(serving.env, serving.folder / "required.log").start()
    try:
        tasks = f"{api.url}/api/celery/tasks"
        assert requests.get(tasks, timeout=5).status_code == 401
        assert requests.get(tasks, headers=bearer(key), timeout=5).status_code == 200
        with serving.app.app_context():
            keys.revoke("ops")  # in this process: the server learns within a second
        wait_for(lambda: requests.get(tasks, headers=bearer(key), timeout=5).status_code == 401,
                 timeout=10, message="the revoked key to be refused")
    finally:
        api.stop()
    assert "CELERY_API_AUTH=off" not in (serving.folder / "required.log").read_text()


def test_make_run_defaults_to_off_only_on_loopback():
    from celery_api.devstack import _loopback

    assert _loopback(None) and _loopback("127.0.0.1:8000") and _loopback("[::1]:8000")
    assert _loopback("localhost:9000") and _loopback("unix:/tmp/api.sock")
    assert not _loopback("0.0.0.0:8000") and not _loopback("10.0.0.5:8000")
