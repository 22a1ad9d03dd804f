"""Console sessions: who is looking at the console, kept server-side.

Signing in checks the API key as the API does (``services.keys.verify``) and opens a
session: a random id (256 bits) goes to the browser in a cookie, the database keeps
its SHA-256, the key's id, a CSRF token and an expiry (``CELERY_API_CONSOLE_SESSION_HOURS``).
The key itself is not kept. Every request reads the session joined with its key, so
the scopes are the key's current ones and a revoked key ends its sessions at once.

With ``CELERY_API_AUTH=off`` a session is opened on the first visit, with no key and
every scope: it still carries the CSRF token that every form posts back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app

from celery_api.extensions import db
from celery_api.models import ApiKey, ConsoleSession, utcnow
from celery_api.services import database, keys
from celery_api.services.keys import SCOPES


@dataclass(frozen=True)
class Viewer:
    """The session of the request: its key (None with authentication off) and scopes."""

    id_hash: str
    csrf_token: str
    key: keys.KeyRecord | None
    scopes: frozenset[str]

    @property
    def name(self) -> str | None:
        return self.key.name if self.key is not None else None

    def can(self, scope: str) -> bool:
        return scope in self.scopes


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def open_session(key: keys.KeyRecord | None) -> str:
    """A new session for ``key`` (None: authentication off); the id for the cookie.

    Expired sessions are deleted on the way (an indexed range delete)."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    hours = current_app.config["CONSOLE_SESSION_HOURS"]
    with database.unavailable_as():
        db.session.execute(sa.delete(ConsoleSession).where(ConsoleSession.expires_at < now))
        db.session.add(ConsoleSession(
            id_hash=_hash(session_id), key_id=key.id if key is not None else None,
            csrf_token=secrets.token_hex(32), created_at=now,
            expires_at=now + timedelta(hours=hours)))
        db.session.commit()
    return session_id


def find(session_id: str | None) -> Viewer | None:
    """The live session named by ``session_id``: not expired, and (authentication on)
    opened with a key that is still active. None otherwise."""
    if not session_id or len(session_id) > 100:
        return None
    auth_off = current_app.config["AUTH"] == "off"
    with database.unavailable_as():
        row = db.session.execute(
            sa.select(ConsoleSession.id_hash, ConsoleSession.csrf_token,
                      ConsoleSession.expires_at, ApiKey.id, ApiKey.name, ApiKey.scopes,
                      ApiKey.secret_hash, ApiKey.revoked_at)
            .outerjoin(ApiKey, ApiKey.id == ConsoleSession.key_id)
            .where(ConsoleSession.id_hash == _hash(session_id))).first()
        db.session.rollback()  # end the read: the request's own work starts clean
    if row is None or row.expires_at <= utcnow():
        return None
    if row.id is None:  # opened with authentication off
        if not auth_off:
            return None
        return Viewer(row.id_hash, row.csrf_token, None, frozenset(SCOPES))
    if row.revoked_at is not None:
        return None
    key = keys.KeyRecord(id=row.id, name=row.name, scopes=frozenset(row.scopes or ()),
                         secret_hash=row.secret_hash, revoked=False)
    scopes = frozenset(SCOPES) if auth_off else key.scopes
    return Viewer(row.id_hash, row.csrf_token, key, scopes)


def close(viewer: Viewer) -> None:
    """Sign out: the session's row is deleted."""
    with database.unavailable_as():
        db.session.execute(sa.delete(ConsoleSession)
                           .where(ConsoleSession.id_hash == viewer.id_hash))
        db.session.commit()


def csrf_matches(viewer: Viewer, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(viewer.csrf_token.encode(),
                                                   presented.encode("utf-8", "replace"))
