"""ha_lease: the lease over the hosts (epoch, expiry in database time); host.owner_epoch

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 20:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    lease = op.create_table('ha_lease',
    sa.Column('scope', sa.String(length=32), nullable=False),
    sa.Column('manager_id', sa.String(length=64), nullable=True),
    sa.Column('epoch', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.Double(), nullable=False),
    sa.Column('acquired_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('scope', name=op.f('pk_ha_lease'))
    )
    # The one row exists from the start: managers starting at the same instant only ever update it.
    op.bulk_insert(lease, [{"scope": "hosts", "manager_id": None, "epoch": 0, "expires_at": 0.0, "acquired_at": 0.0}])
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_epoch', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.drop_column('owner_epoch')
    op.drop_table('ha_lease')
