"""Usage and budgets: an answer keeps the usage the agent reported; per-user daily counters;
per-user budget overrides.

Revision ID: 4f7d2b91c0e3
Revises: c3f1e8a2b6d9
Create Date: 2026-12-06 20:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '4f7d2b91c0e3'
down_revision = 'c3f1e8a2b6d9'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable: user messages have none, nor do answers whose agent reported none (or stored before this).
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('usage', sa.Text(), nullable=True))
    op.create_table(
        'daily_usage',
        sa.Column('user_id', sa.String(length=255), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('turns', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
        sa.Column('estimated_turns', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('user_id', 'day', name=op.f('pk_daily_usage')),
    )
    op.create_table(
        'token_budgets',
        sa.Column('user_id', sa.String(length=255), nullable=False),
        sa.Column('token_limit', sa.BigInteger(), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('user_id', name=op.f('pk_token_budgets')),
    )


def downgrade():
    op.drop_table('token_budgets')
    op.drop_table('daily_usage')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('usage')
