"""Managing conversations: titles a user gives (up to 200 characters), metadata, feedback on answers;
indexes for the retention purge.

Revision ID: 9e3b5c7a1f20
Revises: 4f7d2b91c0e3
Create Date: 2026-12-06 20:20:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '9e3b5c7a1f20'
down_revision = '4f7d2b91c0e3'
branch_labels = None
depends_on = None


def upgrade():
    # On SQLite the table is rebuilt to change the title's type (migrations/env.py turns foreign
    # keys off meanwhile, so that the messages that refer to it stay).
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.alter_column('title', existing_type=sa.String(length=80), type_=sa.String(length=200),
                              existing_nullable=False)
        batch_op.add_column(sa.Column('metadata', sa.Text(), nullable=True))
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('feedback_rating', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('feedback_comment', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('feedback_at', sa.DateTime(timezone=True), nullable=True))
    # The retention purge's scan of old conversations, and the deletes that take a conversation's keys.
    op.create_index('ix_conversations_updated_at', 'conversations', ['updated_at'], unique=False)
    op.create_index('ix_idempotency_keys_conversation_id', 'idempotency_keys', ['conversation_id'], unique=False)


def downgrade():
    op.drop_index('ix_idempotency_keys_conversation_id', table_name='idempotency_keys')
    op.drop_index('ix_conversations_updated_at', table_name='conversations')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('feedback_at')
        batch_op.drop_column('feedback_comment')
        batch_op.drop_column('feedback_rating')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('metadata')
        batch_op.alter_column('title', existing_type=sa.String(length=200), type_=sa.String(length=80),
                              existing_nullable=False)
