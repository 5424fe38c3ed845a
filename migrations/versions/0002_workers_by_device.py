"""workers by device class: jobs.device and the workers registry

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:08:03.430519

Jobs that existed before this revision were all sent to the one `jobs` queue; they get `any`,
and the reaper re-sends a queued one to its device's queue once it has waited `requeue_after_s`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("device", sa.String(length=10), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("hostname", name=op.f("uq_workers_hostname")),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_workers_last_heartbeat_at"), ["last_heartbeat_at"], unique=False
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("device", sa.String(length=10), server_default="any", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("device")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_last_heartbeat_at"))
    op.drop_table("workers")
