"""Usage counters and quota reservations.

`usage_counters` holds, per API key, UTC day and training run, the tokens used and the
tokens reserved by admitted requests that have not finished yet. Futures remember what
they reserved (`quota_reservation`) so the worker settles exactly that when they finish;
runs and futures remember the key they were made with.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COUNTERS = ("training_tokens", "training_tokens_reserved", "prefill_tokens",
            "sampled_tokens", "sampled_tokens_reserved")


def upgrade() -> None:
    op.create_table(
        "usage_counters",
        sa.Column("api_key_id", sa.String(36), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),  # UTC, YYYY-MM-DD
        # '' for usage that belongs to no run (sampling the bare base model).
        sa.Column("training_run_id", sa.String(100), primary_key=True),
        *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0")
          for name in COUNTERS),
    )
    op.create_index("ix_usage_counters_training_run_id", "usage_counters", ["training_run_id"])
    # Plain ADD COLUMN of nullable columns (no table rebuild on SQLite).
    op.add_column("futures", sa.Column("api_key_id", sa.String(36)))
    op.add_column("futures", sa.Column("quota_reservation", sa.Text))
    op.add_column("training_runs", sa.Column("api_key_id", sa.String(36)))
    op.create_index("ix_training_runs_api_key_id", "training_runs", ["api_key_id"])
    op.create_index("ix_futures_api_key_status", "futures", ["api_key_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_futures_api_key_status", "futures")
    op.drop_index("ix_training_runs_api_key_id", "training_runs")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("api_key_id")
    with op.batch_alter_table("futures") as batch:
        batch.drop_column("quota_reservation")
        batch.drop_column("api_key_id")
    op.drop_index("ix_usage_counters_training_run_id", "usage_counters")
    op.drop_table("usage_counters")
