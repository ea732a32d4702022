"""host.bmc_password: room for the sealed form ("fernet:" + token; security/secrets.py)

Passwords stored before are sealed by the manager at its next start (it has the key; a migration has not).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 20:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.alter_column('bmc_password', existing_type=sa.String(length=255), type_=sa.String(length=1024),
                              existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table('host', schema=None) as batch_op:
        batch_op.alter_column('bmc_password', existing_type=sa.String(length=1024), type_=sa.String(length=255),
                              existing_nullable=True)
