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

    register_keys_cli(app)
    from celery_api.schedules_cli import register_schedules_cli

    register_schedules_cli(app)


def register_keys_cli(app: Flask) -> None:
    """``keys create|list|revoke`` (README, Authentication)."""
    from celery_api.services import keys
    from celery_api.services.errors import ServiceError

    @app.cli.group("keys")
    def keys_group():
        """Manage API keys (Authorization: Bearer <key>)."""
        with app.app_context():
            _require_migrated("api_keys")

    @keys_group.command("create")
    @click.argument("name")
    @click.option("--scope", "scopes", multiple=True, required=True,
                  type=click.Choice(keys.SCOPES),
                  help="read, launch, control or admin; repeat for several")
    def create_command(name, scopes):
        """Create a key NAME with the given scopes; print it, once, on the last line."""
        try:
            created = keys.create(name, scopes)
        except ServiceError as exc:
            raise click.ClickException(exc.detail) from exc
        click.echo(f"Created API key {created.name!r} (id {created.id}) with scope(s) "
                   f"{', '.join(created.scopes)}.")
        click.echo("Store it now: it is shown only this once (the database keeps a hash). "
                   "Send it as: Authorization: Bearer <key>")
        click.echo(created.key)

    @keys_group.command("list")
    def list_command():
        """List the keys (never the keys themselves): name, id, scopes, use, state."""
        rows = keys.all_keys()
        if not rows:
            click.echo("No API keys. Create one with: flask --app wsgi keys create NAME "
                       "--scope SCOPE")
            return
        click.echo("name\tid\tscopes\tcreated_at\tlast_used_at\tstate")
        for key in rows:
            state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "active"
            click.echo(f"{key.name}\t{key.id}\t{','.join(key.scopes or [])}\t"
                       f"{_when(key.created_at)}\t{_when(key.last_used_at)}\t{state}")

    @keys_group.command("revoke")
    @click.argument("name")
    def revoke_command(name):
        """Revoke the key NAME: every API process refuses it within
        CELERY_API_AUTH_CACHE_SECONDS (1 s)."""
        try:
            key = keys.revoke(name)
        except ServiceError as exc:
            raise click.ClickException(exc.detail) from exc
        click.echo(f"API key {key.name!r} (id {key.id}) revoked at {_when(key.revoked_at)}.")


def _require_migrated(table: str) -> None:
    """Stop with a message that says what to do when the database has not been migrated
    (a new INSTANCE_PATH, say), instead of a traceback ending in 'no such table'."""
    import sqlalchemy as sa

    from celery_api.extensions import db
    from celery_api.services.database import is_unavailable

    try:
        migrated = sa.inspect(db.engine).has_table(table)
    except sa.exc.SQLAlchemyError as exc:
        if not is_unavailable(exc):
            raise
        raise click.ClickException(
            f"The database at {db.engine.url.render_as_string()} cannot be reached: "
            f"{getattr(exc, 'orig', exc)}") from exc
    if not migrated:
        raise click.ClickException(
            f"The database at {db.engine.url.render_as_string()} has no {table} table: "
            "apply the migrations first, with the same INSTANCE_PATH / DATABASE_URL: "
            "make migrate (or flask --app wsgi db upgrade).")


def _when(moment) -> str:
    return moment.isoformat(timespec="seconds") if moment else "-"
