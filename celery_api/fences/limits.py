"""Flask-Limiter's moving window on Redis in one round trip per limit (issue 16).

Flask-Limiter checks a request's limit with the strategy's ``hit`` (one Redis script:
acquire an entry) and then, to write the RateLimit headers, asks ``get_window_stats``
(a second script: read the window back). Two round trips per limited request.

``OneTripMovingWindow`` runs one script that acquires the entry *and* returns the
window it leaves (its oldest entry and its count), keeps that answer in the request's
``g``, and answers the ``get_window_stats`` that follows from it: one round trip per
limit. The window is the same the second script would have read a moment later, minus
entries other requests added in between (the headers are a hint; the decision is the
script's, atomic as before).

Reaches below the libraries' public API: Flask-Limiter's ``Limiter._limiter`` (the
strategy it built) and the ``limits`` Redis storage's ``prefixed_key`` and
``get_connection``; and, with no per-request limit configured, which request hooks
Flask-Limiter registers (``request_hooks_off``). tests/test_fences.py checks them.
"""

from __future__ import annotations

import time

from flask import g, has_app_context
from flask_limiter import Limiter
from limits import RateLimitItem
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from limits.util import WindowStats

# acquire_moving_window.lua and moving_window.lua of the limits library, in one script:
# returns {acquired (0/1), oldest entry in the window (or false), entries in the window}.
ACQUIRE_AND_READ = """
local timestamp = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local acquired = 0
if amount <= limit then
    local entry = redis.call('lindex', KEYS[1], limit - amount)
    if not (entry and tonumber(entry) >= timestamp - expiry) then
        local entries = {}
        for i = 1, amount do
            entries[i] = timestamp
        end
        for i = 1, #entries, 5000 do
            redis.call('lpush', KEYS[1], unpack(entries, i, math.min(i + 4999, #entries)))
        end
        redis.call('ltrim', KEYS[1], 0, limit - 1)
        redis.call('expire', KEYS[1], expiry)
        acquired = 1
    end
end
local target = timestamp - expiry
local low, high, found = 0, limit - 1, nil
while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', KEYS[1], mid))
    if value and value >= target then
        found = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
if found then
    return {acquired, tostring(redis.call('lindex', KEYS[1], found)), found + 1}
end
return {acquired, false, 0}
"""

CACHE = "_celery_api_rate_windows"


class OneTripMovingWindow(MovingWindowRateLimiter):
    """The moving-window strategy on a ``RedisStorage``: ``hit`` answers the window too."""

    def __init__(self, storage: RedisStorage) -> None:
        super().__init__(storage)
        self.script = storage.get_connection().register_script(ACQUIRE_AND_READ)

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        key = item.key_for(*identifiers)
        now = time.time()
        expiry = item.get_expiry()
        acquired, oldest, count = self.script(
            [self.storage.prefixed_key(key)], [now, item.amount, expiry, cost])
        if has_app_context():
            start = float(oldest) if oldest else now
            g.setdefault(CACHE, {})[key] = WindowStats(start + expiry, item.amount - count)
        return bool(acquired)

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        if has_app_context():
            window = g.get(CACHE, {}).get(item.key_for(*identifiers))
            if window is not None:
                return window
        return super().get_window_stats(item, *identifiers)


def one_trip(limiter: Limiter) -> bool:
    """Give ``limiter`` (after ``init_app``) the one-trip strategy when it counts in Redis
    with the moving window; True when it did."""
    strategy = limiter._limiter
    if type(strategy) is MovingWindowRateLimiter and isinstance(strategy.storage,
                                                                 RedisStorage):
        limiter._limiter = OneTripMovingWindow(strategy.storage)
        return True
    return False


def request_hooks_off(app, limiter: Limiter) -> int:
    """No per-request limit is configured (``CELERY_API_RATE_LIMIT_LAUNCH`` and ``_READ``
    both off): Flask-Limiter's before-request, after-request and teardown hooks would
    still run on every request (its context, its exemption checks: about 5% of a
    launch's CPU) to find nothing to count. They are taken off the app's hook lists and
    ``enabled`` is false, while the strategy and storage it built (``limiter.limiter``)
    stay for the per-task-type limits (``limits.admit``). Returns how many hooks were
    removed: the three ``init_app`` registers, bound to this limiter (its
    ``_check_request_limit``, a ``partial`` of ``__inject_headers`` on it and its
    ``__release_context``); tests/test_fences.py checks that it is three."""
    limiter.enabled = False

    def ours(function) -> bool:
        return (getattr(function, "__self__", None) is limiter
                or limiter in (getattr(function, "args", None) or ()))

    removed = 0
    for hooks in (app.before_request_funcs, app.after_request_funcs,
                  app.teardown_request_funcs):
        kept = [function for function in hooks.get(None, ()) if not ours(function)]
        removed += len(hooks.get(None, ())) - len(kept)
        if None in hooks:
            hooks[None] = kept
    return removed
