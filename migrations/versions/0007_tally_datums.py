"""Screening tally per distinct datum: each training run's screened datum digests (so a
resubmitted datum is counted once), and on the run the counts the dataset-level test
needs besides screened/flagged — high-confidence flags and screened completions.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "screening_tally_datums",
        sa.Column("training_run_id", sa.String(100), sa.ForeignKey("training_runs.id"),
                  primary_key=True),
        sa.Column("datum_sha256", sa.String(64), primary_key=True),
        sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("high_confidence", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.add_column("training_runs", sa.Column("high_confidence_flags", sa.Integer,
                                             nullable=False, server_default="0"))
    # Before this revision the tally counted every datum as a completion; so do old runs.
    op.add_column("training_runs", sa.Column("screened_completions", sa.Integer,
                                             nullable=False, server_default="0"))
    op.execute("UPDATE training_runs SET screened_completions = screened_datums")


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        for name in ("screened_completions", "high_confidence_flags"):
            batch.drop_column(name)
    op.drop_table("screening_tally_datums")
