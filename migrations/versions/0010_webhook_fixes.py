"""webhook fixes: the claim of an attempt being sent, its resets, one open attempt per message"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'

OPEN_ATTEMPT = "status IN ('pending', 'sending')"


def _where(condition):
    return {'postgresql_where': sa.text(condition), 'sqlite_where': sa.text(condition)}


def upgrade():
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('resets', sa.Integer(), nullable=False,
                                      server_default='0'))
    # Concurrent re-sends could leave a message with several open attempts: keep the
    # first, skip the others, so the unique index below can be built.
    op.execute(
        "UPDATE webhook_deliveries SET status = 'skipped', error = 'a duplicate open "
        "attempt of this message (concurrent re-sends); the first one is sent' "
        f"WHERE {OPEN_ATTEMPT} AND EXISTS (SELECT 1 FROM webhook_deliveries AS other "
        "WHERE other.message_id = webhook_deliveries.message_id AND other.id < "
        "webhook_deliveries.id AND other.status IN ('pending', 'sending'))")
    op.create_index('ux_webhook_deliveries_open_message_id', 'webhook_deliveries',
                    ['message_id'], unique=True, **_where(OPEN_ATTEMPT))


def downgrade():
    op.drop_index('ux_webhook_deliveries_open_message_id', table_name='webhook_deliveries')
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_column('resets')
        batch_op.drop_column('claim')
