"""Screening: the verdict cache shared by every process, per-category thresholds owned by
policy (edits audited), and each training run's tally of screened and flagged data.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "screening_verdicts",
        sa.Column("content_sha256", sa.String(64), primary_key=True),
        sa.Column("classifier_version", sa.String(120), primary_key=True),
        sa.Column("scores", sa.Text, nullable=False),  # JSON {category: score}
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "screening_thresholds",
        sa.Column("category", sa.String(120), primary_key=True),  # "<classifier>.<category>"
        sa.Column("threshold", sa.Float, nullable=False),
    )
    op.add_column("training_runs", sa.Column("screened_datums", sa.Integer, nullable=False,
                                             server_default="0"))
    op.add_column("training_runs", sa.Column("flagged_datums", sa.Integer, nullable=False,
                                             server_default="0"))
    op.add_column("training_runs", sa.Column("affirmative_openers", sa.Integer, nullable=False,
                                             server_default="0"))
    op.add_column("training_runs", sa.Column("blocked_reason", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        for name in ("blocked_reason", "affirmative_openers", "flagged_datums",
                     "screened_datums"):
            batch.drop_column(name)
    op.drop_table("screening_thresholds")
    op.drop_table("screening_verdicts")
