"""Schedules: the resource, the next-run computation (DST, month ends, leap days) with
an injected clock, beat's tick (each tick fires once, catch-up, overlap), and real beat
processes firing on the embedded default stack and on Redis + PostgreSQL."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import Schedule, ScheduleFire, TaskRun, utcnow
from celery_api.services import schedules
from tests.support import Beat, assert_problem, wait_for

BASE = "/api/celery/schedules"
ALL_COMPANIES = "sii.sync_documents_all_companies"


def body(**fields) -> dict:
    """A valid create body with ``fields`` changed (None removes a field)."""
    data = {"name": f"s-{uuid.uuid4().hex[:12]}", "task_type": ALL_COMPANIES,
            "params": {"months": 1}, "interval_seconds": 3600, **fields}
    return {k: v for k, v in data.items() if v is not None}


def create(client, **fields) -> dict:
    response = client.post(BASE, json=body(**fields))
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def stored(app, schedule_id: str) -> Schedule:
    with app.app_context():
        schedule = db.session.get(Schedule, schedule_id)
        db.session.expunge_all()
        return schedule


def runs_of(app, schedule_id: str) -> list[TaskRun]:
    with app.app_context():
        rows = db.session.execute(sa.select(TaskRun).where(
            TaskRun.schedule_id == schedule_id).order_by(TaskRun.created_at)).scalars().all()
        db.session.expunge_all()
        return list(rows)


def tick(app, now: datetime) -> int:
    with app.app_context():
        try:
            return schedules.fire_due(now)
        finally:
            db.session.remove()


def set_next(app, schedule_id: str, when: datetime) -> None:
    with app.app_context():
        db.session.execute(sa.update(Schedule).where(Schedule.id == schedule_id)
                           .values(next_run_at=when))
        db.session.commit()


@pytest.fixture(autouse=True)
def no_schedules_left(app):
    """Each test starts with no schedule in the shared app's database (ticks fire all)."""
    with app.app_context():
        db.session.execute(sa.delete(Schedule))
        db.session.commit()
        db.session.remove()


# The resource.

def test_create_get_list_update_delete(client, app):
    created = client.post(BASE, json=body(
        name="nightly-docs", cron="0 2 * * *", timezone="America/Santiago",
        interval_seconds=None, queue="parked", priority=3, tags=["nightly"], expires=600))
    assert created.status_code == 201, created.get_data(as_text=True)
    schedule = created.get_json()
    assert created.headers["Location"] == f"{BASE}/{schedule['id']}"
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "America/Santiago"
    assert schedule["interval_seconds"] is None and schedule["enabled"] is True
    assert schedule["params"] == {"months": 1, "month_offset": 0}  # loaded as a launch
    assert (schedule["runs_fired"], schedule["runs_skipped"], schedule["last_run"]) == \
        (0, 0, None)
    next_run = datetime.fromisoformat(schedule["next_run_at"])
    local = next_run.astimezone(schedules.zone("America/Santiago"))
    assert (local.hour, local.minute) == (2, 0) and next_run > utcnow()

    got = client.get(created.headers["Location"])
    assert got.status_code == 200 and got.get_json() == schedule

    other = create(client, task_type="sii.sync_f29_all_companies", params={})
    listed = client.get(f"{BASE}?task_type={ALL_COMPANIES}").get_json()
    assert schedule["id"] in [s["id"] for s in listed["items"]]
    assert other["id"] not in [s["id"] for s in listed["items"]]

    patched = client.patch(f"{BASE}/{schedule['id']}", json={"interval_seconds": 60,
                                                            "params": {"months": 3}})
    assert patched.status_code == 200, patched.get_data(as_text=True)
    patched = patched.get_json()
    assert (patched["cron"], patched["timezone"], patched["interval_seconds"]) == \
        (None, None, 60.0)
    assert patched["params"] == {"months": 3, "month_offset": 0}
    assert 55 < (datetime.fromisoformat(patched["next_run_at"]) - utcnow()).total_seconds() \
        <= 60

    paused = client.post(f"{BASE}/{schedule['id']}/pause").get_json()
    assert paused["enabled"] is False and paused["next_run_at"] is None
    assert client.post(f"{BASE}/{schedule['id']}/pause").get_json()["enabled"] is False
    assert schedule["id"] in [s["id"] for s in
                              client.get(f"{BASE}?enabled=false").get_json()["items"]]
    assert schedule["id"] not in [s["id"] for s in
                                  client.get(f"{BASE}?enabled=true&limit=1000")
                                  .get_json()["items"]]
    resumed = client.post(f"{BASE}/{schedule['id']}/resume").get_json()
    assert resumed["enabled"] is True and resumed["next_run_at"] is not None

    assert client.delete(f"{BASE}/{schedule['id']}").status_code == 204
    assert_problem(client.get(f"{BASE}/{schedule['id']}"), 404)
    assert_problem(client.delete(f"{BASE}/{schedule['id']}"), 404)
    assert client.delete(f"{BASE}/{other['id']}").status_code == 204


def test_run_now_is_recorded_as_a_run_of_the_schedule_and_kept_after_delete(client, app):
    schedule = create(client, queue="parked")
    answer = client.post(f"{BASE}/{schedule['id']}/run")
    assert answer.status_code == 202, answer.get_data(as_text=True)
    run_id = answer.get_json()["task_id"]
    assert answer.headers["Location"].endswith(f"/tasks/{run_id}")
    shown = client.get(f"{BASE}/{schedule['id']}").get_json()
    assert shown["last_run"]["task_id"] == run_id
    assert shown["last_run"]["status"] == "PENDING" and shown["runs_fired"] == 1
    history = client.get(f"/api/celery/history?schedule_id={schedule['id']}").get_json()
    assert [row["task_id"] for row in history["items"]] == [run_id]
    assert history["items"][0]["schedule_id"] == schedule["id"]
    assert history["items"][0]["scheduled_for"] is not None
    assert client.delete(f"{BASE}/{schedule['id']}").status_code == 204
    kept = client.get(f"/api/celery/history?schedule_id={schedule['id']}").get_json()
    assert [row["task_id"] for row in kept["items"]] == [run_id]


def test_unknown_and_malformed_ids(client):
    missing = str(uuid.uuid4())
    for method, path in (("get", ""), ("patch", ""), ("delete", ""), ("post", "/pause"),
                         ("post", "/resume"), ("post", "/run")):
        kwargs = {"json": {}} if method == "patch" else {}
        assert_problem(getattr(client, method)(f"{BASE}/{missing}{path}", **kwargs), 404)
        bad = assert_problem(getattr(client, method)(f"{BASE}/not-a-uuid{path}", **kwargs),
                             422)
        assert "id" in bad["errors"]["path"]


PAST = "2001-01-01T00:00:00Z"


@pytest.mark.parametrize("fields, field", [
    ({"timezone": "Mars/Olympus", "cron": "0 2 * * *", "interval_seconds": None},
     "timezone"),
    # Files of the zone database that are not IANA zones: the host's own, a placeholder.
    ({"timezone": "localtime", "cron": "0 2 * * *", "interval_seconds": None}, "timezone"),
    ({"timezone": "Factory", "cron": "0 2 * * *", "interval_seconds": None}, "timezone"),
    ({"cron": "1" * 4301 + " * * * *", "interval_seconds": None}, "cron"),
    ({"cron": "61 * * * *", "interval_seconds": None}, "cron"),
    ({"cron": "0 0 30 2 *", "interval_seconds": None}, "cron"),
    ({"cron": "* * *", "interval_seconds": None}, "cron"),
    ({"interval_seconds": 0.5}, "interval_seconds"),
    ({"interval_seconds": None, "run_at": PAST}, "run_at"),
    ({"cron": "0 2 * * *"}, "cron"),  # two triggers
    ({"interval_seconds": None}, "interval_seconds"),  # none
    ({"timezone": "UTC"}, "timezone"),  # a zone without cron
    ({"params": {"months": 13}}, "params"),
    ({"task_type": "sii.sync_documents", "params": {}}, "params"),
    ({"task_type": "no.such.task"}, "task_type"),
    ({"queue": "nobody-consumes-this"}, "queue"),
    ({"overlap": "sometimes"}, "overlap"),
    ({"name": " leading space"}, "name"),
    ({"priority": 10}, "priority"),
])
def test_bad_input_is_422_naming_the_field(client, fields, field):
    answer = assert_problem(client.post(BASE, json=body(**fields)), 422)
    assert field in answer["errors"]["json"], answer
    assert "sys." not in answer["detail"]  # not Python's own advice


def test_duplicate_name_is_422_naming_name(client):
    first = create(client)
    answer = assert_problem(client.post(BASE, json=body(name=first["name"])), 422,
                            "already exists")
    assert "name" in answer["errors"]["json"]
    other = create(client)
    renamed = client.patch(f"{BASE}/{other['id']}", json={"name": first["name"]})
    assert "name" in assert_problem(renamed, 422)["errors"]["json"]


def test_bad_patches_are_422_naming_the_field(client):
    schedule = create(client)
    path = f"{BASE}/{schedule['id']}"
    for patch, field in (({"cron": "0 2 * * *", "interval_seconds": 5}, "cron"),
                         ({"timezone": "America/Santiago"}, "timezone"),
                         ({"run_at": PAST}, "run_at"),
                         ({"params": {"months": 0}}, "params"),
                         ({"task_type": "sii.sync_documents"}, "params")):
        answer = assert_problem(client.patch(path, json=patch), 422)
        assert field in answer["errors"]["json"], (patch, answer)
    assert_problem(client.patch(path), 422, "JSON object")  # no body at all
    assert client.get(path).get_json() == schedule  # nothing changed
    assert client.patch(path, json={}).get_json() == schedule


# The next-run computation, with an injected clock.

def at(zone_name: str, *args, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=schedules.zone(zone_name), fold=fold)


NY = "America/New_York"


def test_a_time_the_clock_skips_runs_at_the_first_minute_after_the_change():
    # 2025-03-09 02:00 EST: New York's clocks jump to 03:00.
    first = schedules.next_run(cron="30 2 * * *", timezone=NY,
                               now=at(NY, 2025, 3, 8, 12, 0))
    assert first == at(NY, 2025, 3, 9, 3, 0)
    second = schedules.next_run(cron="30 2 * * *", timezone=NY, now=first)
    assert second == at(NY, 2025, 3, 10, 2, 30)


def test_a_time_that_repeats_runs_once():
    # 2025-11-02 02:00 EDT: clocks go back to 01:00, so 01:30 happens twice.
    first = schedules.next_run(cron="30 1 * * *", timezone=NY,
                               now=at(NY, 2025, 11, 1, 12, 0))
    assert first == datetime(2025, 11, 2, 5, 30, tzinfo=UTC)  # the first 01:30 (EDT)
    second = schedules.next_run(cron="30 1 * * *", timezone=NY, now=first)
    assert second == datetime(2025, 11, 3, 6, 30, tzinfo=UTC)  # not the second 01:30
    # A job on every half hour runs in both real hours.
    ticks, now = [], datetime(2025, 11, 2, 4, 50, tzinfo=UTC)
    for _ in range(5):
        now = schedules.next_run(cron="*/30 * * * *", timezone=NY, now=now)
        ticks.append(now)
    assert [t.strftime("%H:%M") for t in ticks] == ["05:00", "05:30", "06:00", "06:30",
                                                  "07:00"]


def test_santiago_midnight_on_the_night_the_clock_skips_it():
    # Chile moves 2025-09-07 00:00 to 01:00: the nightly midnight job runs at 01:00.
    when = schedules.next_run(cron="0 0 * * *", timezone="America/Santiago",
                              now=at("America/Santiago", 2025, 9, 6, 12, 0))
    assert when == at("America/Santiago", 2025, 9, 7, 1, 0)


def test_month_ends_and_leap_days():
    day31 = [datetime(2025, 1, 31, tzinfo=UTC)]
    for _ in range(3):
        day31.append(schedules.next_run(cron="0 0 31 * *", now=day31[-1]))
    assert [d.month for d in day31[1:]] == [3, 5, 7]  # months without a 31st are skipped
    leap = schedules.next_run(cron="0 0 29 2 *", now=datetime(2025, 1, 1, tzinfo=UTC))
    assert leap == datetime(2028, 2, 29, tzinfo=UTC)
    last_day = schedules.next_run(cron="0 12 28-31 * *", now=datetime(2024, 2, 28, 13,
                                                                       tzinfo=UTC))
    assert last_day == datetime(2024, 2, 29, 12, tzinfo=UTC)


def test_intervals_and_one_offs():
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert schedules.next_run(interval_seconds=5, now=now) == now + timedelta(seconds=5)
    # After a gap, the next tick keeps the phase of the last one and lies after now.
    late = now + timedelta(seconds=23)
    assert schedules.next_run(interval_seconds=5, now=late, last=now) == \
        now + timedelta(seconds=25)
    assert schedules.next_run(run_at=now, now=now - timedelta(seconds=1)) == now
    assert schedules.next_run(run_at=now, now=now) is None


# Beat's tick, with an injected clock (no beat process: runs wait on a queue).

def test_a_tick_fires_once_and_advances(app, client):
    schedule = create(client, interval_seconds=10, queue="parked", overlap="allow")
    due = datetime.fromisoformat(schedule["next_run_at"])
    assert tick(app, due - timedelta(seconds=1)) == 0
    assert tick(app, due) == 1
    assert tick(app, due) == 0  # the same tick again: nothing
    (run,) = runs_of(app, schedule["id"])
    assert run.scheduled_for == due and run.queue == "parked"
    shown = stored(app, schedule["id"])
    assert shown.next_run_at == due + timedelta(seconds=10)
    assert (shown.runs_fired, shown.last_run_id) == (1, run.id)
    client.delete(f"{BASE}/{schedule['id']}")


def dispatch_pass(app, monkeypatch) -> list[str]:
    """Beat's dispatch pass, twice, with the broker back (the publish recorded, not sent):
    the ids the first published; the second must find nothing left."""
    from celery_api.services import dispatch
    from celery_api.services import launch as launch_service

    published = []
    monkeypatch.setattr(launch_service, "publish",
                        lambda record, *a, **kw: published.append(record["id"]))
    with app.app_context():
        try:
            assert dispatch.publish_due() == len(published) > 0
            assert dispatch.publish_due() == 0
        finally:
            db.session.remove()
    return published


def test_ticks_fired_while_the_broker_is_down_are_held_and_published_later(
        app, client, monkeypatch):
    """A publish that fails leaves the tick's run held (recorded with its fire, due now)
    instead of undoing the fire: one run per tick, no FAILURE, and the pass's other
    schedules are held without trying the broker again (each try waits for its timeout).
    Beat's dispatch pass publishes them once the broker answers."""
    from kombu.exceptions import OperationalError

    from celery_api.services import launch as launch_service

    first = create(client, interval_seconds=10, queue="parked", overlap="allow", expires=600)
    second = create(client, interval_seconds=10, queue="parked", overlap="allow")
    due = max(datetime.fromisoformat(s["next_run_at"]) for s in (first, second))
    publish, tries = launch_service.publish, []

    def broker_down(*args, **kwargs):
        tries.append(args[0]["id"])
        raise OperationalError("the broker is down (injected)")

    monkeypatch.setattr(launch_service, "publish", broker_down)
    assert tick(app, due) == 2
    runs = runs_of(app, first["id"]) + runs_of(app, second["id"])
    assert len(tries) == 1 and [run.status for run in runs] == ["PENDING", "PENDING"]
    assert all(run.dispatch_at is not None for run in runs)
    (expiring,) = runs_of(app, first["id"])
    assert expiring.expires == expiring.created_at + timedelta(seconds=600)
    assert all(stored(app, s["id"]).next_run_at ==
               datetime.fromisoformat(s["next_run_at"]) + timedelta(seconds=10)
               for s in (first, second))
    assert tick(app, due) == 0  # the tick is fired: not again

    assert sorted(dispatch_pass(app, monkeypatch)) == sorted(run.id for run in runs)
    assert all(run.dispatch_at is None and run.status == "PENDING"
               for run in runs_of(app, first["id"]) + runs_of(app, second["id"]))
    monkeypatch.setattr(launch_service, "publish", publish)
    for schedule in (first, second):
        client.delete(f"{BASE}/{schedule['id']}")


class Died(BaseException):
    """Beat's process dying at a point of the tick (not an error it handles)."""


def test_a_beat_that_dies_between_the_fire_and_the_publish_loses_no_tick(
        app, client, monkeypatch):
    """The fire record and the tick's run are written together: a beat that dies after
    that commit, before the publish, leaves the run held; the dispatch pass of the next
    beat publishes it, once. (Before, the fire record was committed first and the run
    launched after it: a beat dying between the two lost the tick for good.)"""
    from celery_api.services import dispatch

    schedule = create(client, interval_seconds=10, queue="parked", overlap="allow",
                      tags=["nightly"])
    due = datetime.fromisoformat(schedule["next_run_at"])

    def die(*args, **kwargs):
        raise Died()

    monkeypatch.setattr(dispatch, "publish_runs", die)
    with pytest.raises(Died):
        tick(app, due)
    (run,) = runs_of(app, schedule["id"])
    assert run.status == "PENDING" and run.dispatch_at is not None
    assert run.scheduled_for == due and run.tags == ["nightly"]
    with app.app_context():
        fire = db.session.execute(sa.select(ScheduleFire).where(
            ScheduleFire.schedule_id == schedule["id"])).scalar_one()
        assert (fire.run_id, fire.outcome) == (run.id, "fired")
        db.session.remove()
    shown = stored(app, schedule["id"])
    assert (shown.last_run_id, shown.runs_fired) == (run.id, 1)
    assert tick(app, due) == 0  # the next beat: the tick is fired

    assert dispatch_pass(app, monkeypatch) == [run.id]
    client.delete(f"{BASE}/{schedule['id']}")


def test_a_tick_another_beat_fired_is_skipped(app, client):
    """The database's guarantee: the fire record of a tick exists, the insert fails."""
    schedule = create(client, interval_seconds=10, queue="parked")
    due = datetime.fromisoformat(schedule["next_run_at"])
    with app.app_context():
        db.session.add(ScheduleFire(schedule_id=schedule["id"], scheduled_for=due,
                                    fired_at=utcnow(), outcome="fired"))
        db.session.commit()
    assert tick(app, due + timedelta(seconds=1)) == 0
    assert runs_of(app, schedule["id"]) == []
    assert stored(app, schedule["id"]).next_run_at == due  # left to the beat that fired it
    client.delete(f"{BASE}/{schedule['id']}")


def test_ticks_missed_while_beat_was_down_run_once(app, client):
    schedule = create(client, interval_seconds=60, queue="parked", overlap="allow")
    due = datetime.fromisoformat(schedule["next_run_at"])
    later = due + timedelta(hours=5, seconds=30)  # 300 ticks missed
    assert tick(app, later) == 1
    assert tick(app, later) == 0
    (run,) = runs_of(app, schedule["id"])
    assert run.scheduled_for == due
    assert stored(app, schedule["id"]).next_run_at == due + timedelta(hours=5, minutes=1)
    client.delete(f"{BASE}/{schedule['id']}")
    # A cron schedule too: one run, then the first tick after now.
    nightly = create(client, cron="0 2 * * *", interval_seconds=None, queue="parked")
    first = datetime.fromisoformat(nightly["next_run_at"])
    assert tick(app, first + timedelta(days=3, hours=1)) == 1
    assert len(runs_of(app, nightly["id"])) == 1
    assert stored(app, nightly["id"]).next_run_at == first + timedelta(days=4)


def test_overlap_skip_skips_while_the_previous_run_is_unfinished(app, client):
    schedule = create(client, interval_seconds=10, queue="parked")  # overlap: skip
    due = datetime.fromisoformat(schedule["next_run_at"])
    assert tick(app, due) == 1
    assert tick(app, due + timedelta(seconds=10)) == 1  # the run is still PENDING: skipped
    assert len(runs_of(app, schedule["id"])) == 1
    shown = client.get(f"{BASE}/{schedule['id']}").get_json()
    assert (shown["runs_fired"], shown["runs_skipped"]) == (1, 1)
    assert shown["last_skipped_at"] is not None
    with app.app_context():
        outcomes = db.session.execute(sa.select(ScheduleFire.outcome).where(
            ScheduleFire.schedule_id == schedule["id"]).order_by(
            ScheduleFire.scheduled_for)).scalars().all()
    assert outcomes == ["fired", "skipped"]
    # allow: the next tick fires although the first run is still queued.
    client.patch(f"{BASE}/{schedule['id']}", json={"overlap": "allow"})
    assert tick(app, due + timedelta(seconds=20)) == 1
    assert len(runs_of(app, schedule["id"])) == 2
    client.delete(f"{BASE}/{schedule['id']}")


def test_paused_and_changed_schedules_take_effect_at_the_next_tick(app, client):
    schedule = create(client, interval_seconds=10, queue="parked")
    due = datetime.fromisoformat(schedule["next_run_at"])
    client.post(f"{BASE}/{schedule['id']}/pause")
    assert tick(app, due + timedelta(hours=1)) == 0
    one_off = create(client, interval_seconds=None, queue="parked",
                     run_at=(utcnow() + timedelta(hours=1)).isoformat())
    run_at = datetime.fromisoformat(one_off["run_at"])
    assert tick(app, run_at) == 1
    assert stored(app, one_off["id"]).next_run_at is None  # done
    assert tick(app, run_at + timedelta(days=1)) == 0
    assert [r.scheduled_for for r in runs_of(app, one_off["id"])] == [run_at]
    for s in (schedule, one_off):
        client.delete(f"{BASE}/{s['id']}")


# Real beat processes.

SCHEDULE_STACKS = [pytest.param(("embedded", "sqlite"), id="embedded-sqlite"),
                   pytest.param(("redis", "postgres"), id="redis-postgres")]


def beat_env(stack) -> dict:
    return dict(stack.env(), CELERY_API_DISPATCH_INTERVAL="0.2",
                CELERY_API_RECONCILE_INTERVAL="3600", CELERY_API_PURGE_INTERVAL="3600")


def count_schedule(stack, **fields) -> tuple[dict, str]:
    key = uuid.uuid4().hex
    return create(stack.client, task_type="acme.count", params={"key": key},
                  interval_seconds=1, overlap="allow", **fields), key


@pytest.mark.integration
@pytest.mark.parametrize("stack", SCHEDULE_STACKS, indirect=True)
def test_a_real_beat_fires_an_interval_schedule(stack):
    schedule, key = count_schedule(stack)
    try:
        with Beat(beat_env(stack), stack.folder / f"beat-{uuid.uuid4().hex[:6]}"):
            def three_done():
                items = stack.client.get(
                    f"/api/celery/history?schedule_id={schedule['id']}&status=SUCCESS"
                ).get_json()["items"]
                return items if len(items) >= 3 else None

            items = wait_for(three_done, timeout=60, interval=0.2,
                             message="three runs of the schedule")
    finally:
        stack.client.delete(f"{BASE}/{schedule['id']}")
    assert all(row["schedule_id"] == schedule["id"] for row in items)
    ticks = sorted(datetime.fromisoformat(row["scheduled_for"]) for row in items)
    assert len(set(ticks)) == len(ticks)
    assert all((b - a).total_seconds() % 1 == 0 for a, b in zip(ticks, ticks[1:],
                                                                 strict=False))


@pytest.mark.integration
@pytest.mark.parametrize("stack", SCHEDULE_STACKS, indirect=True)
def test_two_beats_fire_each_tick_once(stack):
    schedule, key = count_schedule(stack)
    env = beat_env(stack)
    folders = [stack.folder / f"beat-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    try:
        with Beat(env, folders[0]) as first, Beat(env, folders[1]) as second:
            wait_for(lambda: len(runs_of(stack.app, schedule["id"])) >= 6, timeout=60,
                     interval=0.2, message="six ticks fired")
            stack.client.post(f"{BASE}/{schedule['id']}/pause")
        logs = first.log_text() + second.log_text()
    finally:
        stack.client.delete(f"{BASE}/{schedule['id']}")
    runs = runs_of(stack.app, schedule["id"])
    per_tick = Counter(run.scheduled_for for run in runs)
    assert len(per_tick) >= 6 and max(per_tick.values()) == 1, per_tick
    wait_for(lambda: all(r.finished for r in runs_of(stack.app, schedule["id"])),
             timeout=30, message="the runs to finish")
    # Executions, counted by the task itself: one per tick.
    client = stack.celery.backend.client
    assert int(client.get(f"acme:count:{key}") or 0) == len(runs)
    assert first.log_text().count("fired the tick of") >= 1 or \
        second.log_text().count("fired the tick of") >= 1, logs[-3000:]


def test_seed_creates_the_sii_calendar_once(app):
    runner = app.test_cli_runner()
    first = runner.invoke(args=["schedules", "seed"])
    assert first.exit_code == 0 and "created sii-nightly-documents" in first.output
    again = runner.invoke(args=["schedules", "seed"])
    assert again.exit_code == 0 and "already there" in again.output
    listed = runner.invoke(args=["schedules", "list"]).output
    assert "sii-nightly-documents\tcron '0 2 * * *' in America/Santiago\tenabled" in listed
    assert "sii-monthly-f29" in listed


def test_purge_drops_old_fire_records_but_a_one_offs(app, client):
    from celery_api.services import maintenance

    ticking = create(client, interval_seconds=10, queue="parked", overlap="allow")
    one_off = create(client, interval_seconds=None, queue="parked",
                     run_at=(utcnow() + timedelta(seconds=30)).isoformat())
    due = datetime.fromisoformat(ticking["next_run_at"])
    assert tick(app, datetime.fromisoformat(one_off["run_at"])) == 2
    with app.app_context():
        maintenance.purge(older_than_days=-1)  # the cutoff: tomorrow
        left = db.session.execute(sa.select(ScheduleFire.schedule_id)).scalars().all()
        db.session.remove()
    assert left == [one_off["id"]]
    client.post(f"{BASE}/{one_off['id']}/pause")
    resumed = client.post(f"{BASE}/{one_off['id']}/resume").get_json()
    assert resumed["next_run_at"] is None  # it fired: resuming does not fire it again
    assert due < utcnow() + timedelta(seconds=20)


def test_a_default_worked_out_at_launch_is_worked_out_at_each_run(app, client, monkeypatch):
    """sii.sync_f29_all_companies' year defaults to the current year: a schedule made
    without it must not keep the year it was made in (the monthly F29 schedule would
    sync that year forever); each run gets the year of its launch. Defaults that are
    constants are shown as loaded."""
    from celery_api.tasks import sii

    given = create(client, task_type="sii.sync_f29_all_companies", params={"year": "2025"})
    assert given["params"] == {"year": "2025"}  # a year given is kept
    schedule = create(client, task_type="sii.sync_f29_all_companies", params={})
    assert schedule["params"] == {}
    assert stored(app, schedule["id"]).params == {}

    class Later(date):  # the calendar moved on since the schedule was made
        @classmethod
        def today(cls):
            return cls(2031, 3, 13)

    monkeypatch.setattr(sii, "date", Later)
    fired = client.post(f"{BASE}/{schedule['id']}/run")
    assert fired.status_code == 202, fired.get_data(as_text=True)
    (run,) = runs_of(app, schedule["id"])
    assert run.params == {"year": "2031"}


@pytest.mark.parametrize("year", ["٢٠٢٥", "２０２５", "2O25", "20255"])
def test_a_year_in_other_digits_is_refused(client, year):
    """Only ASCII digits: str.isdigit() accepts Arabic-Indic and fullwidth ones."""
    response = client.post("/api/celery/tasks/launch", json={
        "task_type": "sii.sync_f29_all_companies", "params": {"year": year}})
    assert_problem(response, 422, "params.year")


def test_of_two_deletes_at_once_one_finds_it_gone(app, client, monkeypatch):
    """Two DELETEs of one schedule at the same moment: both read it, one deletes it,
    the other then deletes nothing and answers 404 (both answered 204). The window is
    held open by deleting the row from another connection right after the read."""
    schedule = create(client)
    real_get = schedules.get

    def get_then_lose_the_race(schedule_id):
        found = real_get(schedule_id)
        with db.engine.begin() as other:  # the other request, committing first
            other.execute(sa.delete(Schedule).where(Schedule.id == schedule_id))
        return found

    monkeypatch.setattr(schedules, "get", get_then_lose_the_race)
    assert_problem(client.delete(f"{BASE}/{schedule['id']}"), 404)
    monkeypatch.setattr(schedules, "get", real_get)
    assert_problem(client.get(f"{BASE}/{schedule['id']}"), 404)
