"""``flask --app wsgi schedules seed|list`` (README, Schedules)."""

from __future__ import annotations

import click
from flask import Flask


def register_schedules_cli(app: Flask) -> None:
    from celery_api.services import schedules

    @app.cli.group("schedules")
    def schedules_group():
        """Schedules stored in the database (fired by beat)."""

    @schedules_group.command("seed")
    def seed_command():
        """Create the SII calendar (nightly documents, monthly F29) if missing."""
        created = schedules.seed_sii()
        names = [s["name"] for s in schedules.SII_SCHEDULES]
        click.echo(f"created {', '.join(created)}" if created
                   else f"already there: {', '.join(names)}")

    @schedules_group.command("list")
    def list_command():
        """Print each schedule: name, trigger, enabled, next run."""
        rows, _total = schedules.listing(limit=10_000)
        for row in rows:
            click.echo(f"{row.name}\t{schedules.describe(row)}\t"
                       f"{'enabled' if row.enabled else 'paused'}\t"
                       f"{row.next_run_at.isoformat() if row.next_run_at else '-'}")
