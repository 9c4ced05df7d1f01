"""An assistant message keeps the model that answered it.

Revision ID: 5d1c0a7e2f44
Revises: 3b6e7f918e23
Create Date: 2026-12-02 02:20:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '5d1c0a7e2f44'
down_revision = '3b6e7f918e23'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable: user messages have none, and the answers stored before this do not know theirs.
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model', sa.String(length=255), nullable=True))


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('model')
