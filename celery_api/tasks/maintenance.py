"""The service's own periodic tasks (run by beat; not in the catalog, not in history)."""

from __future__ import annotations

from celery import shared_task

from celery_api.services import maintenance


@shared_task(name="celery_api.reconcile_runs", ignore_result=True)
def reconcile_runs() -> dict:
    return maintenance.reconcile()


@shared_task(name="celery_api.purge_history", ignore_result=True)
def purge_history() -> int:
    return maintenance.purge()
