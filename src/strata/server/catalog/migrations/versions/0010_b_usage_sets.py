"""usage sets: each endpoint's learned boot set and working set (pipelined restore)

Revision ID: 0010_b_usage_sets
Revises: 0009_a_reflectors
Create Date: 2026-12-02 15:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0010_b_usage_sets'
down_revision = '0009_a_reflectors'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_sets',
    sa.Column('endpoint_id', sa.String(length=36), nullable=False),
    sa.Column('boot', sa.JSON(), nullable=False),
    sa.Column('working', sa.JSON(), nullable=False),
    sa.Column('boots_seen', sa.Integer(), nullable=False),
    sa.Column('learned_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('endpoint_id')
    )


def downgrade() -> None:
    op.drop_table('usage_sets')
