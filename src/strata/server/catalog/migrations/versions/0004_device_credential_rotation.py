"""device credential rotation: when the credential was issued, and the one before it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Columns and a unique index only: SQLite adds them in place (a unique constraint would
    # make Alembic copy the table, which the foreign keys to it refuse).
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('credential_issued_at', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('previous_credential_hash', sa.String(length=64),
                                      nullable=True))
    op.create_index('ix_endpoints_previous_credential_hash', 'endpoints',
                    ['previous_credential_hash'], unique=True)


def downgrade() -> None:
    op.drop_index('ix_endpoints_previous_credential_hash', table_name='endpoints')
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.drop_column('previous_credential_hash')
        batch_op.drop_column('credential_issued_at')
