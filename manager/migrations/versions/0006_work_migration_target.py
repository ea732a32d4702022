"""op_ha_work.target_host_id: a Migration item's target, so that a restarted manager knows where it was going

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Items stored before read NULL: a manager restarted during such a migration learns the target from the
    # reports, as before this column.
    with op.batch_alter_table('op_ha_work', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target_host_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_op_ha_work_target_host_id_host'), 'host', ['target_host_id'],
                                    ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('op_ha_work', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_op_ha_work_target_host_id_host'), type_='foreignkey')
        batch_op.drop_column('target_host_id')
