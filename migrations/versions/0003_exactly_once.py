"""exactly once: runs held for a later publish (dispatch_at), one open retry per run"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'

OPEN_RETRY = ("retry_of IS NOT NULL AND status IN "
              "('PENDING', 'RECEIVED', 'RETRY', 'STARTED', 'PROGRESS')")


def _where(condition):
    return {'postgresql_where': sa.text(condition), 'sqlite_where': sa.text(condition)}


def upgrade():
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatch_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_task_runs_dispatch_at', 'task_runs', ['dispatch_at'], unique=False,
                    **_where('dispatch_at IS NOT NULL'))
    # A database holding two unfinished retries of one run (possible before this rule)
    # fails here, loudly: finish or revoke one of them, then upgrade again.
    op.create_index('ux_task_runs_open_retry', 'task_runs', ['retry_of'], unique=True,
                    **_where(OPEN_RETRY))


def downgrade():
    op.drop_index('ux_task_runs_open_retry', table_name='task_runs')
    op.drop_index('ix_task_runs_dispatch_at', table_name='task_runs')
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.drop_column('dispatch_at')
