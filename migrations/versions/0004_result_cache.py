"""result cache: jobs.cache and jobs.fingerprint

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00.000000

Jobs that succeeded before this revision have no fingerprint, so nothing reuses them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cache", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=True))
        batch_op.create_index(
            "ix_jobs_project_fingerprint", ["project_id", "fingerprint"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_project_fingerprint")
        batch_op.drop_column("fingerprint")
        batch_op.drop_column("cache")
