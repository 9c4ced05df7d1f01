"""Page conversations by (updated_at, id).

Revision ID: 3b6e7f918e23
Revises: e63081988ac1
Create Date: 2026-11-25 22:56:22.501070

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '3b6e7f918e23'
down_revision = 'e63081988ac1'
branch_labels = None
depends_on = None


def upgrade():
    # The new index first, so that listing is never without one.
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index('ix_conversations_user_id_updated_at_id', ['user_id', 'updated_at', 'id'], unique=False)
        batch_op.drop_index('ix_conversations_user_id_updated_at')


def downgrade():
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index('ix_conversations_user_id_updated_at', ['user_id', 'updated_at'], unique=False)
        batch_op.drop_index('ix_conversations_user_id_updated_at_id')
