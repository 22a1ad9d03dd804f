"""result cache: each run's cache identity (cache_key), one unfinished run per identity"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'

OPEN_CACHE_KEY = ("cache_key IS NOT NULL AND status IN "
                  "('PENDING', 'RECEIVED', 'RETRY', 'STARTED', 'PROGRESS')")


def _where(condition):
    return {'postgresql_where': sa.text(condition), 'sqlite_where': sa.text(condition)}


def upgrade():
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_key', sa.String(length=64), nullable=True))
    # Existing runs have no cache_key: nothing to check, nothing served from them.
    op.create_index('ux_task_runs_open_cache_key', 'task_runs', ['cache_key'], unique=True,
                    **_where(OPEN_CACHE_KEY))
    op.create_index('ix_task_runs_cache_key_created_at', 'task_runs',
                    ['cache_key', 'created_at'], unique=False,
                    **_where('cache_key IS NOT NULL'))


def downgrade():
    op.drop_index('ix_task_runs_cache_key_created_at', table_name='task_runs')
    op.drop_index('ux_task_runs_open_cache_key', table_name='task_runs')
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.drop_column('cache_key')
