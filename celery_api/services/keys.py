"""API keys: create, list, revoke, and check a presented key (README, Authentication).

A key reads ``cak_<id>_<secret>``: ``id`` is 12 hex digits, public (``keys list``
shows it), and finds the row; ``secret`` is 64 hex digits from ``secrets`` (256
bits). The database keeps only the SHA-256 of the whole key, compared with
``hmac.compare_digest``. A fast hash is right here: bcrypt, scrypt and argon2 are
slow on purpose so that guessing a *human-chosen* password from its hash is
expensive; a 256-bit random secret cannot be guessed at any hash speed, so slowness
would buy nothing and would cost every request (bcrypt at its default cost is about
0.2 s of CPU, SHA-256 of a key about a microsecond).

Lookups are cached per process for ``AUTH_CACHE_SECONDS`` (1 s by default), so a
key revoked from any process stops working everywhere within that time, and one
revoked by this process at once. ``last_used_at`` is written at most once a minute
per key (``TOUCH_INTERVAL``), never on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from cachetools import TTLCache
from flask import current_app
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from celery_api.extensions import db
from celery_api.models import ApiKey, ConsoleSession, utcnow
from celery_api.services.errors import Conflict, InvalidParams, NotFound, Unavailable

log = logging.getLogger("celery_api.auth")

PREFIX = "cak"
# read: catalog, status, history, stats; launch: launch, batch, retry; control: revoke,
# cancel; admin: schedules, webhooks, keys. No scope implies another.
SCOPES = ("read", "launch", "control", "admin")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$")
KEY = re.compile(rf"^{PREFIX}_([0-9a-f]{{12}})_([0-9a-f]{{64}})$")
TOUCH_INTERVAL = timedelta(minutes=1)
CACHE_SIZE = 1024


@dataclass(frozen=True)
class KeyRecord:
    """What a request needs to know of a key (no secret, only its hash)."""

    id: str
    name: str
    scopes: frozenset[str]
    secret_hash: str
    revoked: bool


@dataclass(frozen=True)
class Created:
    key: str  # the only time the whole key exists outside the caller's hands
    id: str
    name: str
    scopes: tuple[str, ...]


class InvalidKey(Exception):
    """The presented key is malformed, unknown, wrong or revoked (``reason`` says which)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# A hash no key has: an unknown id is compared against it too, so an answer takes
# the same time whether the id exists or not.
_NO_KEY = digest(f"{PREFIX}_unknown")


def validate_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise InvalidParams(
            f"Invalid key name {name!r}: 1 to 64 letters, digits and . _ @ : - "
            "(starting with a letter or digit).")
    return name


def validate_scopes(scopes) -> tuple[str, ...]:
    chosen = tuple(sorted(set(scopes), key=SCOPES.index)) if scopes else ()
    unknown = set(scopes or ()) - set(SCOPES)
    if unknown or not chosen:
        raise InvalidParams(f"Scopes must be one or more of {', '.join(SCOPES)} "
                            f"(got {', '.join(sorted(unknown)) or 'none'}).")
    return chosen


def create(name: str, scopes) -> Created:
    """Store a new key (its hash) and return it: the caller shows it once."""
    name = validate_name(name)
    chosen = validate_scopes(scopes)
    if db.session.execute(sa.select(ApiKey.id).where(ApiKey.name == name)).first():
        raise Conflict(f"A key named {name!r} exists already (revoked keys keep their "
                       "names, which the history records): choose another name.")
    for _attempt in range(3):  # 48-bit ids: a collision is a once-in-a-lifetime retry
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}_{key_id}_{secrets.token_hex(32)}"
        db.session.add(ApiKey(id=key_id, name=name, secret_hash=digest(key),
                              scopes=list(chosen), created_at=utcnow()))
        try:
            db.session.commit()
        except IntegrityError as exc:
            db.session.rollback()
            if db.session.execute(sa.select(ApiKey.id).where(ApiKey.name == name)).first():
                raise Conflict(f"A key named {name!r} exists already.") from exc
            continue
        log.info("🔑 created API key %s (%s) with scopes %s", name, key_id, ",".join(chosen))
        return Created(key=key, id=key_id, name=name, scopes=chosen)
    raise RuntimeError("could not pick an unused key id")  # pragma: no cover


def all_keys() -> list[ApiKey]:
    return list(db.session.execute(
        sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)).scalars())


def revoke(name: str) -> ApiKey:
    """Revoke the key named ``name``; it stops working at once in this process, and
    within ``AUTH_CACHE_SECONDS`` in every other. Revoking twice changes nothing."""
    key = db.session.execute(sa.select(ApiKey).where(ApiKey.name == name)).scalar_one_or_none()
    if key is None:
        raise NotFound(f"No API key is named {name!r} (see keys list).")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        # Its console sessions end with it (they are refused anyway: see console.sessions).
        db.session.execute(sa.delete(ConsoleSession).where(ConsoleSession.key_id == key.id))
        db.session.commit()
        log.info("🚫 revoked API key %s (%s)", key.name, key.id)
    _forget(key.id)
    return key


def has_active_key() -> bool:
    return db.session.execute(
        sa.select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None


# The per-process cache of lookups, and when each key's last_used_at was last written.

_lock = threading.Lock()
_touched: dict[str, float] = {}


def _cache_for_app() -> TTLCache | None:
    """This app's cache of key records (None when ``AUTH_CACHE_SECONDS`` is 0)."""
    seconds = current_app.config.get("AUTH_CACHE_SECONDS", 1.0)
    if seconds <= 0:
        return None
    cache = current_app.extensions.get("celery_api.key_cache")
    if cache is not None:
        return cache  # no new TTLCache built per request just to be thrown away
    with _lock:
        return current_app.extensions.setdefault(
            "celery_api.key_cache", TTLCache(maxsize=CACHE_SIZE, ttl=seconds))


def _forget(key_id: str) -> None:
    cache = _cache_for_app()
    if cache is not None:
        with _lock:
            cache.pop(key_id, None)


def _load(key_id: str) -> KeyRecord | None:
    try:
        row = db.session.execute(
            sa.select(ApiKey.id, ApiKey.name, ApiKey.scopes, ApiKey.secret_hash,
                      ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
        db.session.rollback()  # end the read: the request's own work starts clean
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.error("❌ could not check an API key: %s", exc)
        raise Unavailable("The database is unreachable, so the API key cannot be checked; "
                          "retry shortly.") from exc
    if row is None:
        return None
    return KeyRecord(id=row.id, name=row.name, scopes=frozenset(row.scopes or ()),
                     secret_hash=row.secret_hash, revoked=row.revoked_at is not None)


def verify(presented: str) -> KeyRecord:
    """The key record for ``presented`` (a whole key), or InvalidKey. Constant time in
    the secret: the hashes are compared with ``hmac.compare_digest``."""
    match = KEY.match(presented or "")
    if match is None:
        raise InvalidKey("The API key is malformed: keys read cak_<id>_<secret>.")
    key_id = match.group(1)
    cache = _cache_for_app()
    record = None
    if cache is not None:
        with _lock:
            record = cache.get(key_id)
    if record is None:
        record = _load(key_id)
        if record is not None and cache is not None:
            with _lock:
                cache[key_id] = record  # unknown ids are not cached: no one fills it
    matches = hmac.compare_digest(record.secret_hash if record else _NO_KEY,
                                  digest(presented))
    if record is None or not matches:
        raise InvalidKey("The API key is not valid.")
    if record.revoked:
        raise InvalidKey(f"The API key {record.name!r} was revoked.")
    return record


def touch(record: KeyRecord) -> None:
    """Record that the key was used: at most once a minute per key and process, and
    the update itself skips a row written less than a minute ago by another process."""
    now = time.monotonic()
    with _lock:
        last = _touched.get(record.id)
        if last is not None and now - last < TOUCH_INTERVAL.total_seconds():
            return
        _touched[record.id] = now
    moment = utcnow()
    try:
        # A connection of its own: the request's session and transaction stay untouched.
        with db.engine.begin() as connection:
            connection.execute(
                sa.update(ApiKey)
                .where(ApiKey.id == record.id,
                       sa.or_(ApiKey.last_used_at.is_(None),
                              ApiKey.last_used_at < moment - TOUCH_INTERVAL))
                .values(last_used_at=moment))
    except SQLAlchemyError as exc:  # a missed write of last_used_at must not fail a call
        log.warning("could not record the use of API key %s: %s", record.name, exc)
