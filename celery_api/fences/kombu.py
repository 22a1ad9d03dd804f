"""kombu internals this service relies on.

- ``kombu.transport.redis.Channel``: ``_q_for_pri`` (the Redis list of one priority
  step of a queue), ``priority_steps``, ``unacked_key`` (the hash of messages
  delivered but not acknowledged, each stored as ``[message, exchange, routing_key]``)
  and ``client``. Used to tell whether a run's message is anywhere in the broker.
"""

from __future__ import annotations

import json

from kombu.transport import redis as redis_transport


def is_redis_channel(channel) -> bool:
    return isinstance(channel, redis_transport.Channel)


def _task_id(message) -> str | None:
    if isinstance(message, bytes | str):
        message = json.loads(message)
    return (message.get("headers") or {}).get("id") if isinstance(message, dict) else None


def redis_message_ids(channel, queues: list[str], limit: int) -> set[str] | None:
    """The task ids of the messages waiting in ``queues`` (every priority step) or held
    unacknowledged by a worker; None when more than ``limit`` wait in one list."""
    client = channel.client
    ids: set[str] = set()
    for queue in queues:
        for step in channel.priority_steps:
            key = channel._q_for_pri(queue, step)
            if client.llen(key) > limit:
                return None
            ids.update(_task_id(raw) for raw in client.lrange(key, 0, -1))
    for raw in client.hvals(channel.unacked_key):
        ids.add(_task_id(json.loads(raw)[0]))
    ids.discard(None)
    return ids
