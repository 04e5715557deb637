"""Durable run state: which files under the checkpoint root hold each training run's state.

After every job that changes a run's adapter (create, load, forward_backward with a
backward pass, optim_step) the worker writes a snapshot or a log entry to disk before the
job's result commits (engine.run_state), and records here, in the same transaction, the
seq_id of the snapshot (`durable_weights_seq`) and of the last logged job after it
(`durable_log_seq`, NULL when none). A restarted or different worker restores the run from
these.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("durable_weights_seq", sa.BigInteger))
    op.add_column("training_runs", sa.Column("durable_log_seq", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        for name in ("durable_log_seq", "durable_weights_seq"):
            batch.drop_column(name)
