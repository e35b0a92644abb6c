"""branch reflectors, and what an enrollment token enrolls

Revision ID: 0009_a_reflectors
Revises: 0008_d_task_members_software
Create Date: 2026-12-02 15:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009_a_reflectors'
down_revision = '0008_d_task_members_software'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('enrollment_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purpose', sa.String(length=16), nullable=False,
                                      server_default='endpoint'))
    op.create_table(
        'reflectors',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('url', sa.String(length=255), nullable=False),
        sa.Column('tls_cert', sa.Text(), nullable=False),
        sa.Column('tls_fingerprint', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('status_reason', sa.Text(), nullable=False),
        sa.Column('credential_hash', sa.String(length=64), nullable=False),
        sa.Column('token_id', sa.Integer(), nullable=True),
        sa.Column('enrolled_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_ip', sa.String(length=64), nullable=False),
        sa.Column('bytes_from_server', sa.BigInteger(), nullable=False),
        sa.Column('chunks_from_server', sa.BigInteger(), nullable=False),
        sa.Column('fallbacks', sa.BigInteger(), nullable=False),
        sa.Column('bad_chunks', sa.BigInteger(), nullable=False),
        sa.Column('stats', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['token_id'], ['enrollment_tokens.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('credential_hash'),
    )


def downgrade() -> None:
    op.drop_table('reflectors')
    with op.batch_alter_table('enrollment_tokens', schema=None) as batch_op:
        batch_op.drop_column('purpose')
