"""schedules: the schedules table, one fire record per tick, scheduled_for on task_runs"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'


def upgrade():
    op.create_table(
        'schedules',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('task_type', sa.String(length=200), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('queue', sa.String(length=200), nullable=True),
        sa.Column('priority', sa.Integer(), nullable=True),
        sa.Column('tags', sa.JSON(), nullable=False),
        sa.Column('expires', sa.Float(), nullable=True),
        sa.Column('cron', sa.String(length=200), nullable=True),
        sa.Column('timezone', sa.String(length=64), nullable=False),
        sa.Column('interval_seconds', sa.Float(), nullable=True),
        sa.Column('run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('overlap', sa.String(length=8), nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_run_id', sa.String(length=155), nullable=True),
        sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_skipped_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('runs_fired', sa.Integer(), server_default='0', nullable=False),
        sa.Column('runs_skipped', sa.Integer(), server_default='0', nullable=False),
        sa.Column('created_by', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_schedules')),
        sa.UniqueConstraint('name', name=op.f('uq_schedules_name')),
    )
    # Beat's query each tick reads the enabled schedules by next_run_at.
    op.create_index('ix_schedules_next_run_at', 'schedules', ['next_run_at'], unique=False,
                    postgresql_where=sa.text('enabled'), sqlite_where=sa.text('enabled'))
    op.create_index('ix_schedules_task_type', 'schedules', ['task_type'], unique=False)
    op.create_table(
        'schedule_fires',
        sa.Column('schedule_id', sa.String(length=36), nullable=False),
        sa.Column('scheduled_for', sa.DateTime(timezone=True), nullable=False),
        sa.Column('fired_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('run_id', sa.String(length=155), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('schedule_id', 'scheduled_for', name=op.f('pk_schedule_fires')),
    )
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheduled_for', sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade():
    with op.batch_alter_table('task_runs', schema=None) as batch_op:
        batch_op.drop_column('scheduled_for')
    op.drop_table('schedule_fires')
    op.drop_index('ix_schedules_task_type', table_name='schedules')
    op.drop_index('ix_schedules_next_run_at', table_name='schedules')
    op.drop_table('schedules')
