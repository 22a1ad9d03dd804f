"""Celery tasks shipped with the service (all ``@shared_task``)."""
