"""idempotency keys: one row per (scope, Idempotency-Key), the stored answer"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'


def upgrade():
    op.create_table(
        'idempotency_keys',
        sa.Column('scope', sa.String(length=400), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('request_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('headers', sa.JSON(), nullable=True),
        sa.Column('body', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('scope', 'key', name=op.f('pk_idempotency_keys')),
    )
    # The purge deletes expired keys.
    op.create_index('ix_idempotency_keys_expires_at', 'idempotency_keys', ['expires_at'],
                    unique=False)


def downgrade():
    op.drop_index('ix_idempotency_keys_expires_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
