"""compliance measured by each agent on its live tree

Revision ID: 0007_e_live_compliance
Revises: 0006_e_moved_history
Create Date: 2026-12-02 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007_e_live_compliance'
down_revision = '0006_e_moved_history'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('live_compliance',
    sa.Column('endpoint_id', sa.String(length=36), nullable=False),
    sa.Column('applied_key', sa.String(length=32), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('endpoint_id')
    )


def downgrade() -> None:
    op.drop_table('live_compliance')
