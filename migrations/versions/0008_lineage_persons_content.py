"""Lineage, persons and content-bound approvals.

- Lineage: each training run records the checkpoint (and run) its adapter was last loaded
  from, each checkpoint the checkpoint its run was loaded from when it was saved, each
  sampler the run whose weights it samples; `run_lineage` holds every run a run's weights
  descend from (backfilled from the audit trail's `api.load_weights` rows), and
  `lineage_holds` the quarantines that hold a run and its descendants.
- Persons: who enrolled each principal and who issued each key (backfilled from the audit
  trail's `keys.create` rows); at most one open access request per name.
- Content-bound overrides: an override keeps the checkpoint's SHA-256 and the keys used
  for each half, and can be cancelled.
- Ids are never reused: on SQLite the integer-keyed tables (checkpoints, release_reports,
  policy_rules) are rebuilt with AUTOINCREMENT, and the checkpoints counter starts above
  every checkpoint id any record still names. (PostgreSQL sequences never reuse ids.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
AUTOINCREMENT_TABLES = ("checkpoints", "release_reports", "policy_rules")
# Tables that name checkpoints by id (without a foreign key: the records outlive them).
CHECKPOINT_REFERENCES = (("release_requests", "checkpoint_id"),
                         ("release_reports", "checkpoint_id"),
                         ("release_overrides", "checkpoint_id"),
                         ("samplers", "checkpoint_id"))
OPEN_REQUEST_SQL = "status IN ('pending', 'approved')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _autoincrement_on_sqlite()
    _lineage()
    _persons()
    for name, type_ in (("adapter_sha256", sa.String(64)), ("requested_key_id", sa.String(36)),
                        ("approved_key_id", sa.String(36)), ("cancel_reason", sa.Text)):
        op.add_column("release_overrides", sa.Column(name, type_))


def _autoincrement_on_sqlite() -> None:
    """Rebuild each integer-keyed table with AUTOINCREMENT (ids kept). Dropping the old
    `checkpoints` fires samplers' ON DELETE SET NULL, so their links are put back."""
    bind = op.get_bind()
    links = bind.execute(sa.text("SELECT id, checkpoint_id FROM samplers "
                                 "WHERE checkpoint_id IS NOT NULL")).all()
    for table in AUTOINCREMENT_TABLES:
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": True}):
            pass
    for sampler_id, checkpoint_id in links:
        bind.execute(sa.text("UPDATE samplers SET checkpoint_id = :c WHERE id = :s"),
                     {"c": checkpoint_id, "s": sampler_id})
    highest = max([0] + [bind.execute(sa.text(f"SELECT max({column}) FROM {table}")).scalar()
                         or 0 for table, column in CHECKPOINT_REFERENCES])
    for table in AUTOINCREMENT_TABLES:
        _bump_sqlite_sequence(table, highest if table == "checkpoints" else 0)


def _bump_sqlite_sequence(table: str, floor: int) -> None:
    bind = op.get_bind()
    current = bind.execute(sa.text(f"SELECT max(id) FROM {table}")).scalar() or 0
    value = max(current, floor)
    bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
    bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"),
                 {"t": table, "v": value})


def _lineage() -> None:
    op.add_column("training_runs", sa.Column("parent_run_id", sa.String(100)))
    op.add_column("training_runs", sa.Column("parent_checkpoint_id", sa.Integer))
    op.add_column("checkpoints", sa.Column("parent_checkpoint_id", sa.Integer))
    op.add_column("samplers", sa.Column("parent_run_id", sa.String(100)))
    op.create_table(
        "run_lineage",
        sa.Column("run_id", sa.String(100), sa.ForeignKey("training_runs.id"),
                  primary_key=True),
        sa.Column("ancestor_run_id", sa.String(100), sa.ForeignKey("training_runs.id"),
                  primary_key=True),
        sa.Column("via_checkpoint_id", sa.Integer, nullable=False),
        sa.Column("via_tinker_path", sa.String(400), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_run_lineage_ancestor_run_id", "run_lineage", ["ancestor_run_id"])
    op.create_table(
        "lineage_holds",
        sa.Column("checkpoint_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("training_run_id", sa.String(100), nullable=False),
        sa.Column("tinker_path", sa.String(400), nullable=False),
        sa.Column("adapter_sha256", sa.String(64)),
        sa.Column("release_id", sa.String(40)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("lifted_at", TZ),
        sa.Column("lifted_by", sa.String(40)),
    )
    op.create_index("ix_lineage_holds_training_run_id", "lineage_holds", ["training_run_id"])
    _backfill_lineage()
    _backfill_holds()


def _backfill_lineage() -> None:
    """Each allowed `load_weights` in the audit trail, in order: the loading run descends
    from the source's run and from everything that run descended from by then; its parent
    is the last source it loaded."""
    bind = op.get_bind()
    runs = {row[0] for row in bind.execute(sa.text("SELECT id FROM training_runs"))}
    ancestors: dict[str, dict[str, tuple[int, str]]] = {}
    parents: dict[str, tuple[str, int]] = {}
    rows = bind.execute(sa.text(
        "SELECT subject, payload FROM audit_log WHERE event_type = 'api.load_weights' "
        "AND decision = 'allow' ORDER BY seq")).all()
    for child, payload in rows:
        source = json.loads(payload).get("source", "")
        parent = source.removeprefix("tinker://").split("/")[0]
        if child not in runs or parent not in runs or child == parent:
            continue
        via = _checkpoint_id(source)
        parents[child] = (parent, via)
        mine = ancestors.setdefault(child, {})
        mine.setdefault(parent, (via, source))
        for grand, edge in ancestors.get(parent, {}).items():
            if grand != child:
                mine.setdefault(grand, edge)
    now = dt.datetime.now(dt.UTC)
    table = sa.table("run_lineage", sa.column("run_id"), sa.column("ancestor_run_id"),
                     sa.column("via_checkpoint_id"), sa.column("via_tinker_path"),
                     sa.column("created_at", TZ))
    for child, mine in ancestors.items():
        for parent, (via, path) in mine.items():
            bind.execute(table.insert().values(run_id=child, ancestor_run_id=parent,
                                               via_checkpoint_id=via, via_tinker_path=path,
                                               created_at=now))
    for child, (parent, via) in parents.items():
        bind.execute(sa.text("UPDATE training_runs SET parent_run_id = :p, "
                             "parent_checkpoint_id = :c WHERE id = :r"),
                     {"p": parent, "c": via or None, "r": child})


def _checkpoint_id(path: str) -> int:
    found = op.get_bind().execute(sa.text("SELECT id FROM checkpoints WHERE tinker_path = :p"),
                                  {"p": path}).scalar()
    return int(found or 0)  # 0: the source was deleted before this revision


def _backfill_holds() -> None:
    """Checkpoints quarantined before this revision hold their runs too."""
    op.execute(
        "INSERT INTO lineage_holds (checkpoint_id, training_run_id, tinker_path, "
        "adapter_sha256, created_at) SELECT id, training_run_id, tinker_path, adapter_sha256, "
        "created_at FROM checkpoints WHERE release_state = 'quarantined'")


def _persons() -> None:
    op.add_column("principals", sa.Column("enrolled_by", sa.String(200)))
    op.add_column("principals", sa.Column("enrolled_via", sa.String(40)))
    op.add_column("api_keys", sa.Column("created_by", sa.String(200)))
    op.add_column("api_keys", sa.Column("created_via", sa.String(40)))
    op.create_index("uq_access_requests_open_name", "access_requests", ["name"], unique=True,
                    sqlite_where=sa.text(OPEN_REQUEST_SQL),
                    postgresql_where=sa.text(OPEN_REQUEST_SQL))
    _backfill_issuers()


def _backfill_issuers() -> None:
    """The audit trail's `keys.create` rows name who issued each key; the first one for a
    principal names who enrolled it (through an access request when the key was claimed,
    by an admin when the actor is a principal, else by an operator)."""
    bind = op.get_bind()
    admins = {row[0] for row in bind.execute(sa.text("SELECT id FROM principals"))}
    claimed = {row[0] for row in bind.execute(sa.text(
        "SELECT key_id FROM access_requests WHERE key_id IS NOT NULL"))}
    rows = bind.execute(sa.text("SELECT actor, subject, payload FROM audit_log WHERE "
                                "event_type = 'keys.create' ORDER BY seq")).all()
    enrolled: set[str] = set()
    for actor, principal_id, payload in rows:
        key_id = json.loads(payload).get("key_id")
        via = ("access_request" if key_id in claimed
               else "admin" if actor in admins else "operator")
        bind.execute(sa.text("UPDATE api_keys SET created_by = :a, created_via = :v "
                             "WHERE id = :k"), {"a": actor, "v": via, "k": key_id})
        if principal_id not in enrolled:
            enrolled.add(principal_id)
            bind.execute(sa.text("UPDATE principals SET enrolled_by = :a, enrolled_via = :v "
                                 "WHERE id = :p"), {"a": actor, "v": via, "p": principal_id})


def downgrade() -> None:
    op.drop_index("uq_access_requests_open_name", "access_requests")
    for table, columns in (("release_overrides", ("cancel_reason", "approved_key_id",
                                                  "requested_key_id", "adapter_sha256")),
                           ("api_keys", ("created_via", "created_by")),
                           ("principals", ("enrolled_via", "enrolled_by")),
                           ("samplers", ("parent_run_id",)),
                           ("checkpoints", ("parent_checkpoint_id",)),
                           ("training_runs", ("parent_checkpoint_id", "parent_run_id"))):
        for name in columns:  # plain DROP COLUMN: a batch rebuild would trip foreign keys
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    op.drop_table("lineage_holds")
    op.drop_table("run_lineage")
