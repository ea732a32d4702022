"""id_high_water: the highest VM and work ids ever given out, so that a deleted VM's id is never given again

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('id_high_water',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('high', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('kind', name=op.f('pk_id_high_water'))
    )


def downgrade() -> None:
    op.drop_table('id_high_water')
