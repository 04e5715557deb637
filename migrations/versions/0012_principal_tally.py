"""Screening tally per person: every distinct datum screened for a principal, in any of
their training runs or dry runs, and the counts the dataset-level test needs, so that
neither a new run nor a dry run starts the evidence afresh.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COUNTS = ("screened_datums", "flagged_datums", "high_confidence_flags")


def upgrade() -> None:
    op.create_table(
        "principal_tally_datums",
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"),
                  primary_key=True),
        sa.Column("datum_sha256", sa.String(64), primary_key=True),
        sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("high_confidence", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    for name in COUNTS:
        op.add_column("principals", sa.Column(name, sa.Integer, nullable=False,
                                              server_default="0"))
    op.add_column("principals", sa.Column("screening_blocked_reason", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("principals") as batch:
        for name in ("screening_blocked_reason", *reversed(COUNTS)):
            batch.drop_column(name)
    op.drop_table("principal_tally_datums")
