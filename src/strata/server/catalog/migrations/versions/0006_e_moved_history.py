"""snapshots moved by a restore to new hardware: when they moved (retention protects them)

Revision ID: 0006_e_moved_history
Revises: 0005
Create Date: 2026-12-02 15:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006_e_moved_history'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('moved_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_column('moved_at')
