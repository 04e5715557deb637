"""Initial schema: principals, keys, sessions, training runs, checkpoints, samplers,
futures, and the append-only audit log with its triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ),
        sa.Column("revoked_at", TZ),
    )
    op.create_table(
        "client_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("sdk_version", sa.String(40)),
        sa.Column("display_name", sa.String(200)),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("user_metadata", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_heartbeat_at", TZ),
        sa.Column("finished_at", TZ),
        sa.Column("finish_reason", sa.String(40)),
    )
    op.create_index("ix_client_sessions_principal_id", "client_sessions", ["principal_id"])
    op.create_table(
        "training_runs",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("client_sessions.id"),
                  nullable=False),
        sa.Column("model_seq_id", sa.Integer, nullable=False),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("base_model", sa.String(300), nullable=False),
        sa.Column("lora_rank", sa.Integer, nullable=False),
        sa.Column("lora_config", sa.Text, nullable=False),
        sa.Column("user_metadata", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_request_time", TZ, nullable=False),
        sa.UniqueConstraint("session_id", "model_seq_id"),
    )
    op.create_index("ix_training_runs_principal_id", "training_runs", ["principal_id"])
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("training_run_id", sa.String(100), sa.ForeignKey("training_runs.id"),
                  nullable=False),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tinker_path", sa.String(400), nullable=False, unique=True),
        sa.Column("storage_dir", sa.String(400), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("has_optimizer", sa.Boolean, nullable=False),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("release_state", sa.String(20), nullable=False),
        sa.Column("user_metadata", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ),
        sa.UniqueConstraint("training_run_id", "kind", "name"),
    )
    op.create_index("ix_checkpoints_training_run_id", "checkpoints", ["training_run_id"])
    op.create_index("ix_checkpoints_principal_id", "checkpoints", ["principal_id"])
    op.create_table(
        "samplers",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("client_sessions.id"),
                  nullable=False),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("base_model", sa.String(300), nullable=False),
        sa.Column("model_path", sa.String(400)),
        sa.Column("checkpoint_id", sa.Integer,
                  sa.ForeignKey("checkpoints.id", ondelete="SET NULL")),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_samplers_principal_id", "samplers", ["principal_id"])
    op.create_table(
        "futures",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("principal_id", sa.String(36), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("model_id", sa.String(100)),
        sa.Column("sampler_id", sa.String(100)),
        sa.Column("seq_id", sa.BigInteger),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("request_format", sa.String(10), nullable=False),
        sa.Column("request_payload", sa.LargeBinary, nullable=False),
        sa.Column("result_format", sa.String(10)),
        sa.Column("result_payload", sa.LargeBinary),
        sa.Column("error_message", sa.Text),
        sa.Column("error_category", sa.String(20)),
        sa.Column("worker_id", sa.String(100)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("claimed_at", TZ),
        sa.Column("finished_at", TZ),
        sa.UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
        sa.UniqueConstraint("sampler_id", "seq_id", name="uq_futures_sampler_seq"),
    )
    op.create_index("ix_futures_principal_id", "futures", ["principal_id"])
    op.create_index("ix_futures_status_created", "futures", ["status", "created_at"])
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("event_type", sa.String(80), nullable=False),
        sa.Column("subject", sa.String(400), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("mac", sa.String(64)),
        sa.Column("key_id", sa.String(64)),
        sa.Column("hash_version", sa.SmallInteger, nullable=False),
    )
    for col in ("actor", "event_type", "decision", "request_id"):
        op.create_index(f"ix_audit_log_{col}", "audit_log", [col])
    _create_append_only_triggers()


def _create_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{action.lower()} BEFORE {action} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )
        return
    op.execute(
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END; $$ LANGUAGE plpgsql"
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )
    # TRUNCATE fires no row triggers; it needs its own statement trigger.
    op.execute(
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
    )


def downgrade() -> None:
    # The audit log is evidence: this revision cannot be rolled back.
    raise RuntimeError("the initial schema (and its audit log) cannot be downgraded")
