"""task members (cancel, retry) and installed software

Revision ID: 0008_d_task_members_software
Revises: 0007_e_live_compliance
Create Date: 2026-12-02 15:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008_d_task_members_software'
down_revision = '0007_e_live_compliance'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('task_members',
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('endpoint_id', sa.String(length=36), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('previous', sa.JSON(), nullable=False),
    sa.Column('target', sa.JSON(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('task_id', 'endpoint_id')
    )
    with op.batch_alter_table('task_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_task_members_endpoint_id'), ['endpoint_id'],
                              unique=False)
    # Tasks made before this revision: their endpoints become members (nothing recorded
    # to put back, so a cancel leaves their assignment as it is).
    conn = op.get_bind()
    tasks = sa.table('tasks', sa.column('id', sa.Integer()), sa.column('endpoints', sa.JSON()))
    known = {r[0] for r in conn.execute(sa.text('SELECT id FROM endpoints'))}
    members = sa.table('task_members', sa.column('task_id', sa.Integer()),
                       sa.column('endpoint_id', sa.String()), sa.column('state', sa.String()),
                       sa.column('previous', sa.JSON()), sa.column('target', sa.JSON()),
                       sa.column('attempts', sa.Integer()))
    rows = [{'task_id': tid, 'endpoint_id': eid, 'state': 'queued', 'previous': {},
             'target': {}, 'attempts': 1}
            for tid, eids in conn.execute(sa.select(tasks.c.id, tasks.c.endpoints))
            for eid in dict.fromkeys(eids or []) if eid in known]
    if rows:
        op.bulk_insert(members, rows)

    op.create_table('software_lists',
    sa.Column('endpoint_id', sa.String(length=36), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('packages', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('endpoint_id')
    )
    op.create_table('installed_packages',
    sa.Column('endpoint_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('arch', sa.String(length=32), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('manager', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('endpoint_id', 'name', 'arch')
    )
    with op.batch_alter_table('installed_packages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_installed_packages_name'), ['name'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('installed_packages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_installed_packages_name'))
    op.drop_table('installed_packages')
    op.drop_table('software_lists')
    with op.batch_alter_table('task_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_task_members_endpoint_id'))
    op.drop_table('task_members')
