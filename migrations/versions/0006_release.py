"""Release gate: one row per release evaluation (its trigger, progress and decision), the
stored evaluation reports, the per-(model, suite) score cache, the two-person override
requests, and on each checkpoint the adapter checksum and whether it is to be published
once released.

Rows refer to checkpoints by id without a foreign key: a report outlives the checkpoint
it decided (deleting weights must not delete the evidence).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "release_requests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("checkpoint_id", sa.Integer, nullable=False, index=True),
        sa.Column("tinker_path", sa.String(400), nullable=False),
        sa.Column("training_run_id", sa.String(100), nullable=False, index=True),
        sa.Column("principal_id", sa.String(36), nullable=False, index=True),  # the owner
        sa.Column("requested_by", sa.String(200), nullable=False),  # actor, as in audit
        sa.Column("trigger", sa.String(20), nullable=False),  # export | publish | request
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("future_id", sa.String(64)),
        sa.Column("progress_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("progress_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("progress_note", sa.String(200), nullable=False, server_default=""),
        sa.Column("report_id", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("decided_at", TZ),
    )
    op.create_table(
        "release_reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("release_id", sa.String(40), nullable=False, index=True),
        sa.Column("checkpoint_id", sa.Integer, nullable=False, index=True),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("report", sa.Text, nullable=False),  # canonical JSON, exactly as hashed
        sa.Column("report_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "eval_results",
        sa.Column("model_sha256", sa.String(64), primary_key=True),
        sa.Column("suite_sha256", sa.String(64), primary_key=True),
        sa.Column("runner_version", sa.String(40), primary_key=True),
        sa.Column("scores", sa.Text, nullable=False),  # JSON per-item scores
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "release_overrides",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("checkpoint_id", sa.Integer, nullable=False, index=True),
        sa.Column("tinker_path", sa.String(400), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),  # pending | approved
        sa.Column("requested_by", sa.String(36), nullable=False),  # principal id
        sa.Column("request_reason", sa.Text, nullable=False),
        sa.Column("approved_by", sa.String(36)),
        sa.Column("approve_reason", sa.Text),
        sa.Column("requested_at", TZ, nullable=False),
        sa.Column("decided_at", TZ),
    )
    op.add_column("checkpoints", sa.Column("adapter_sha256", sa.String(64)))
    op.add_column("checkpoints", sa.Column("publish_on_release", sa.Boolean, nullable=False,
                                           server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("publish_on_release")
        batch.drop_column("adapter_sha256")
    for table in ("release_overrides", "eval_results", "release_reports", "release_requests"):
        op.drop_table(table)
