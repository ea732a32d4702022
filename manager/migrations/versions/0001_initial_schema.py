"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25 08:24:11.854294
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql
revision: str = '0001'
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('configuration',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('value', sa.String(length=1024), nullable=True),
    sa.Column('default_value', sa.String(length=1024), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('scope', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_configuration'))
    )
    op.create_table('event',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.Double(), nullable=False),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('subject', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event'))
    )
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index('ix_event_subject_id', ['subject', 'id'], unique=False)

    op.create_table('mshost',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.Double(), nullable=False),
    sa.Column('last_heartbeat_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mshost'))
    )
    op.create_table('host',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('uuid', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('status', sa.Enum('Connecting', 'Up', 'Disconnected', 'Investigating', 'Alert', 'Fencing', 'Fenced', 'Down', 'Removed', name='hoststatus', native_enum=False, length=32), nullable=False),
    sa.Column('resource_state', sa.Enum('Enabled', 'Disabled', 'PrepareForMaintenance', 'Maintenance', 'ErrorInMaintenance', name='resourcestate', native_enum=False, length=32), nullable=False),
    sa.Column('role', sa.Enum('Routing', 'Storage', 'Other', name='hostrole', native_enum=False, length=32), nullable=False),
    sa.Column('last_ping_at', sa.Double(), nullable=True),
    sa.Column('cpus', sa.Integer(), nullable=False),
    sa.Column('memory_mib', sa.Integer(), nullable=False),
    sa.Column('manager_id', sa.String(length=64), nullable=True),
    sa.Column('agent_version', sa.String(length=64), nullable=False),
    sa.Column('libvirt_version', sa.String(length=64), nullable=False),
    sa.Column('qemu_version', sa.String(length=64), nullable=False),
    sa.Column('boot_id', sa.String(length=64), nullable=False),
    sa.Column('bmc_address', sa.String(length=255), nullable=True),
    sa.Column('bmc_port', sa.Integer(), nullable=True),
    sa.Column('bmc_user', sa.String(length=64), nullable=True),
    sa.Column('bmc_password', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['manager_id'], ['mshost.id'], name=op.f('fk_host_manager_id_mshost'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_host')),
    sa.UniqueConstraint('uuid', name=op.f('uq_host_uuid'))
    )
    op.create_table('vm_instance',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('uuid', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('state', sa.Enum('Starting', 'Running', 'Stopping', 'Stopped', 'Migrating', 'Error', 'Unmanaged', name='vmstate', native_enum=False, length=32), nullable=False),
    sa.Column('power_state', sa.Enum('PowerOn', 'PowerOff', 'PowerReportMissing', 'PowerUnknown', name='powerstate', native_enum=False, length=32), nullable=False),
    sa.Column('power_state_updated_at', sa.Double(), nullable=True),
    sa.Column('host_id', sa.Integer(), nullable=True),
    sa.Column('last_host_id', sa.Integer(), nullable=True),
    sa.Column('ha_enabled', sa.Boolean(), nullable=False),
    sa.Column('restart_priority', sa.Integer(), nullable=False),
    sa.Column('anti_affinity_group', sa.String(length=255), nullable=True),
    sa.Column('domain_xml', sa.Text().with_variant(mysql.MEDIUMTEXT(), 'mariadb').with_variant(mysql.MEDIUMTEXT(), 'mysql'), nullable=False),
    sa.Column('memory_mib', sa.Integer(), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('update_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['host.id'], name=op.f('fk_vm_instance_host_id_host'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['last_host_id'], ['host.id'], name=op.f('fk_vm_instance_last_host_id_host'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vm_instance')),
    sa.UniqueConstraint('uuid', name=op.f('uq_vm_instance_uuid'))
    )
    with op.batch_alter_table('vm_instance', schema=None) as batch_op:
        batch_op.create_index('ix_vm_instance_host_id', ['host_id'], unique=False)

    op.create_table('op_ha_work',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('instance_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('type', sa.Enum('HA', 'Stop', 'ForceStop', 'Destroy', 'CheckStop', 'Migration', name='worktype', native_enum=False, length=32), nullable=False),
    sa.Column('step', sa.Enum('Scheduled', 'Investigating', 'Fencing', 'Stopping', 'Restarting', 'Done', 'Error', 'Cancelled', name='workstep', native_enum=False, length=32), nullable=False),
    sa.Column('host_id', sa.Integer(), nullable=True),
    sa.Column('previous_state', sa.Enum('Starting', 'Running', 'Stopping', 'Stopped', 'Migrating', 'Error', 'Unmanaged', name='vmstate', native_enum=False, length=32), nullable=False),
    sa.Column('vm_update_count', sa.Integer(), nullable=False),
    sa.Column('taken_by', sa.String(length=64), nullable=True),
    sa.Column('taken_at', sa.Double(), nullable=True),
    sa.Column('tried', sa.Integer(), nullable=False),
    sa.Column('time_to_try_at', sa.Double(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.Column('active_instance_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.CheckConstraint("(active_instance_id IS NULL) OR (active_instance_id = instance_id AND type = 'HA' AND step IN ('Scheduled', 'Investigating', 'Fencing', 'Stopping', 'Restarting'))", name=op.f('ck_op_ha_work_active_instance')),
    sa.ForeignKeyConstraint(['host_id'], ['host.id'], name=op.f('fk_op_ha_work_host_id_host'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['instance_id'], ['vm_instance.id'], name=op.f('fk_op_ha_work_instance_id_vm_instance'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['taken_by'], ['mshost.id'], name=op.f('fk_op_ha_work_taken_by_mshost'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_op_ha_work')),
    sa.UniqueConstraint('active_instance_id', name=op.f('uq_op_ha_work_active_instance_id'))
    )
    with op.batch_alter_table('op_ha_work', schema=None) as batch_op:
        batch_op.create_index('ix_op_ha_work_step_time_to_try_at', ['step', 'time_to_try_at'], unique=False)



def downgrade() -> None:
    # Dropping a table drops its indexes; dropping the index first fails on MariaDB (a foreign key needs it).
    for table in ("op_ha_work", "vm_instance", "host", "mshost", "event", "configuration"):
        op.drop_table(table)
