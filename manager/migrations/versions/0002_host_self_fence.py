"""host: the self-fence guarantee at the agent's last contact (watchdog bound and detail) and its lock manager

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 19:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Existing hosts read "not armed" until their agent's next Hello: the safe side (never dead by silence).
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.add_column(sa.Column('watchdog_timeout_s', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('watchdog_detail', sa.String(length=255), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('lease_manager', sa.String(length=32), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.drop_column('lease_manager')
        batch_op.drop_column('watchdog_detail')
        batch_op.drop_column('watchdog_timeout_s')
