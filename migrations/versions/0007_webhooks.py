"""webhooks: subscriptions, deliveries (the outbox and the delivery log), a launch's
own webhook_url
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'

PENDING = sa.text("status = 'pending'")


def upgrade():
    with op.batch_alter_table('task_runs') as batch:
        batch.add_column(sa.Column('webhook_url', sa.String(length=2048), nullable=True))
    op.create_table(
        'webhook_subscriptions',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('event_types', sa.JSON(), nullable=False),
        sa.Column('task_type', sa.String(length=200), nullable=True),
        sa.Column('description', sa.String(length=500), nullable=True),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('disabled_reason', sa.Text(), nullable=True),
        sa.Column('secret', sa.String(length=100), nullable=False),
        sa.Column('previous_secret', sa.String(length=100), nullable=True),
        sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_by', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_subscriptions')),
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  autoincrement=True, nullable=False),
        sa.Column('message_id', sa.String(length=64), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('subscription_id', sa.String(length=36), nullable=True),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('event_type', sa.String(length=40), nullable=False),
        sa.Column('run_id', sa.String(length=155), nullable=True),
        sa.Column('payload', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('duration_ms', sa.Float(), nullable=True),
        sa.Column('next_retry_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
        sa.UniqueConstraint('message_id', 'attempt',
                            name=op.f('uq_webhook_deliveries_message_id')),
    )
    op.create_index('ix_webhook_deliveries_subscription_id_id', 'webhook_deliveries',
                    ['subscription_id', 'id'], unique=False)
    where = sa.text('run_id IS NOT NULL')
    op.create_index('ix_webhook_deliveries_run_id', 'webhook_deliveries', ['run_id'],
                    unique=False, postgresql_where=where, sqlite_where=where)
    op.create_index('ix_webhook_deliveries_pending_due_at', 'webhook_deliveries', ['due_at'],
                    unique=False, postgresql_where=PENDING, sqlite_where=PENDING)


def downgrade():
    op.drop_index('ix_webhook_deliveries_pending_due_at', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_run_id', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_subscription_id_id', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_subscriptions')
    with op.batch_alter_table('task_runs') as batch:
        batch.drop_column('webhook_url')
