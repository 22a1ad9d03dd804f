"""kombu internals this service relies on (tests/test_fences.py checks each one).

- ``kombu.transport.redis.Channel._create_client(asynchronous=False)``, ``Client``
  and ``pool``: the Redis transport builds a new ``redis.Redis`` for every publish;
  :func:`reuse_redis_client` wraps it so a channel keeps one client, on one connection
  of the channel's pool (about a fifth of a publish's CPU).
- ``kombu.Connection._reraise_as_library_errors()``: the context manager kombu's own
  ``ensure`` uses to turn transport errors (redis-py's, amqp's) into kombu's
  ``OperationalError``; the launch path publishes inside it to get the same errors.
- ``kombu.transport.redis.Channel``: ``_q_for_pri`` (the Redis list of one priority
  step of a queue), ``priority_steps``, ``unacked_key`` (the hash of messages
  delivered but not acknowledged, each stored as ``[message, exchange, routing_key]``)
  and ``client``. Used to tell whether a run's message is anywhere in the broker.
"""

from __future__ import annotations

import json
from os import getpid

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


def reraise_as_library_errors(connection):
    """Transport errors raised inside the block come out as kombu's own errors."""
    return connection._reraise_as_library_errors()


def reuse_redis_client(channel) -> None:
    """Let kombu's Redis channel publish through one client instead of one per message.

    kombu's Redis transport builds a new ``redis.Redis`` (over its connection pool) for
    every publish: about a fifth of a publish's CPU here (docs/BENCHMARKS.md). A pooled
    channel serves one producer at a time, so the channel keeps the client it built, as
    long as its pool is the same, and that client keeps one connection of the pool
    (redis-py's ``single_connection_client``) instead of taking one from the pool and
    giving it back around each command, with the pool's check that the connection has
    nothing left to read (a non-blocking read, and two timeout changes, per publish).
    A connection the server closed fails the next command with a connection error:
    kombu's ``ensure`` (the publish's retry policy) then publishes again on a revived
    channel, and redis-py reconnects the held connection on its next command.
    Only channels of kombu's Redis transport are changed; any other is left as it is.
    """
    if not is_redis_channel(channel) or getattr(channel, "_celery_api_reuses_client", False):
        return
    create = channel._create_client
    built: dict = {}

    def create_client(asynchronous=False):
        if asynchronous:
            return create(asynchronous=True)
        pool = channel.pool
        client = built.get("client")
        # A forked child (a Celery prefork worker launching fan-out) never writes on its
        # parent's socket: the held connection is the parent's, so it builds its own.
        if client is None or client.connection_pool is not pool or built["pid"] != getpid():
            # As kombu builds it, holding one connection of the pool for good.
            options = {"connection_pool": pool, "single_connection_client": True}
            provider = pool.connection_kwargs.get("credential_provider")
            if provider is not None:
                options["credential_provider"] = provider
            client = built["client"] = channel.Client(**options)
            built["pid"] = getpid()
        return client

    channel._create_client = create_client
    channel._celery_api_reuses_client = True
