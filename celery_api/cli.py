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
