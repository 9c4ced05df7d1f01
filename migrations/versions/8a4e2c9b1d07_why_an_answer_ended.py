"""An assistant message keeps why it ended: stop, length or stopped.

Revision ID: 8a4e2c9b1d07
Revises: 5d1c0a7e2f44
Create Date: 2026-12-02 02:50:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '8a4e2c9b1d07'
down_revision = '5d1c0a7e2f44'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable: user messages have none, and the answers stored before this do not know theirs.
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finish_reason', sa.String(length=16), nullable=True))


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('finish_reason')
