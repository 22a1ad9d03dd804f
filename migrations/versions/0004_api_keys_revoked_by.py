"""api keys: the api_keys table; who revoked a run (revoked_by), history filters by key"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'


def _where(condition):
    return {'postgresql_where': sa.text(condition), 'sqlite_where': sa.text(condition)}


def upgrade():
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('scopes', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('name', name=op.f('uq_api_keys_name')),
    )
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revoked_by', sa.String(length=200), nullable=True))
    # The history filters launched_by and revoked_by, newest first (as every filter).
    op.create_index('ix_task_runs_launched_by_created_at', 'task_runs',
                    ['launched_by', 'created_at'], unique=False,
                    **_where('launched_by IS NOT NULL'))
    op.create_index('ix_task_runs_revoked_by_created_at', 'task_runs',
                    ['revoked_by', 'created_at'], unique=False,
                    **_where('revoked_by IS NOT NULL'))


def downgrade():
    op.drop_index('ix_task_runs_revoked_by_created_at', table_name='task_runs')
    op.drop_index('ix_task_runs_launched_by_created_at', table_name='task_runs')
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.drop_column('revoked_by')
    op.drop_table('api_keys')
