"""Access requests (request → approve/reject → claim once) and per-key scopes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "access_requests",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("contact", sa.String(300), nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("wanted_base_models", sa.Text, nullable=False),
        sa.Column("claim_token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("expires_in_days", sa.Integer),
        sa.Column("decided_by", sa.String(200)),  # an actor, as in the audit log
        sa.Column("decision_reason", sa.Text),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("api_keys.id")),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("decided_at", TZ),
        sa.Column("claimed_at", TZ),
    )
    op.create_index("ix_access_requests_status", "access_requests", ["status"])
    # Plain ADD COLUMN (SQLite supports it with a constant default; no table rebuild).
    op.add_column("api_keys", sa.Column("scopes", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes")
    op.drop_index("ix_access_requests_status", "access_requests")
    op.drop_table("access_requests")
