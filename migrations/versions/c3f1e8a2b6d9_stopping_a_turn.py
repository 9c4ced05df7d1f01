"""A conversation can be asked to stop the turn that holds it.

Revision ID: c3f1e8a2b6d9
Revises: 8a4e2c9b1d07
Create Date: 2026-12-02 03:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'c3f1e8a2b6d9'
down_revision = '8a4e2c9b1d07'
branch_labels = None
depends_on = None


def upgrade():
    # The claim token of the turn to stop: a later turn's claim has another token, so an old value
    # never stops it, and nothing needs clearing.
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stop_requested', sa.Uuid(), nullable=True))


def downgrade():
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('stop_requested')
