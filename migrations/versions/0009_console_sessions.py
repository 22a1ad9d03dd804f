"""console sessions: one row per signed-in browser of the operator console"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'


def upgrade():
    op.create_table(
        'console_sessions',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=True),
        sa.Column('csrf_token', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id_hash', name=op.f('pk_console_sessions')),
    )
    # Sign-in deletes the expired sessions; revoking a key ends its sessions.
    op.create_index('ix_console_sessions_expires_at', 'console_sessions', ['expires_at'],
                    unique=False)
    op.create_index('ix_console_sessions_key_id', 'console_sessions', ['key_id'],
                    unique=False)


def downgrade():
    op.drop_index('ix_console_sessions_key_id', table_name='console_sessions')
    op.drop_index('ix_console_sessions_expires_at', table_name='console_sessions')
    op.drop_table('console_sessions')
