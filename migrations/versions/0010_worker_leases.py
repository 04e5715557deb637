"""Worker leases: each worker's heartbeat, and which worker holds each training run.

A worker claims a run's jobs only while no other live worker holds the run's lease; it holds
the leases of the runs it ran and renews them with its heartbeat. A worker whose heartbeat
stops loses its leases when they expire, and the futures it was running go back in the
queue; another worker then restores those runs from durable state.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker_id", sa.String(100), primary_key=True),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=False),
    )
    op.add_column("training_runs", sa.Column("lease_worker_id", sa.String(100)))
    op.add_column("training_runs", sa.Column("lease_expires_at", TZ))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        for name in ("lease_expires_at", "lease_worker_id"):
            batch.drop_column(name)
    op.drop_table("worker_heartbeats")
