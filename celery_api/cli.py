"""``flask`` commands of the service."""

from __future__ import annotations

import click
from flask import Flask


def register_cli(app: Flask) -> None:
    @app.cli.command("catalog")
    def catalog_command():
        """Print the task types of the catalog."""
        from celery_api.catalog import get_catalog

        for definition in get_catalog():
            click.echo(f"{definition.task_type}\t{definition.celery_name}\t{definition.name}")

    @app.cli.group("history")
    def history_group():
        """Maintain the history of runs."""

    @history_group.command("purge")
    @click.option("--older-than-days", type=float, default=None,
                  help="Default: CELERY_API_HISTORY_RETENTION_DAYS")
    def purge_command(older_than_days):
        """Delete finished runs older than the retention (never running ones)."""
        from celery_api.services import maintenance

        click.echo(f"purged {maintenance.purge(older_than_days=older_than_days)} run(s)")

    @history_group.command("reconcile")
    @click.option("--grace-seconds", type=float, default=None,
                  help="Default: CELERY_API_RECONCILE_GRACE_SECONDS")
    def reconcile_command(grace_seconds):
        """Mark FAILURE the runs recorded as running that no live worker runs."""
        from celery_api.services import maintenance

        outcome = maintenance.reconcile(grace_seconds=grace_seconds)
        click.echo(f"checked {outcome['checked']} running run(s), {outcome['lost']} lost")
