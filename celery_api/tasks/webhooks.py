"""The webhook delivery task: one attempt of one delivery row, on the ``webhooks`` queue.

Consumed only by the webhook worker (``make webhook-worker``), never by the task
workers: a slow or dead receiver holds a webhook worker thread, not a task slot.
"""

from __future__ import annotations

from celery import shared_task

from celery_api.services import webhooks


@shared_task(name=webhooks.TASK_NAME, ignore_result=True)
def deliver_webhook(delivery_id: int) -> str:
    return webhooks.deliver_safely(delivery_id)
