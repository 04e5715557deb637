"""ORM models: who may call (principals, API keys), what they own (client sessions,
training runs, checkpoints, samplers), the futures queue, and the audit log.

Must not hold business rules; must not be used to create tables (Alembic does).
Every owned object carries `principal_id` so ownership is checked in one query.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes even for timezone-aware columns: they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


ROLES = ("researcher", "auditor", "admin")


class Principal(Base):
    """A person or service account; owns keys and everything trained with them.
    `enrolled_by` is who brought the person in: an admin's principal id (a key created
    through the admin API, or the admin who approved the access request), or an operator
    actor such as "cli"; `enrolled_via` says how ("admin", "access_request", "operator")."""

    __tablename__ = "principals"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    enrolled_by: Mapped[str | None] = mapped_column(String(200))
    enrolled_via: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The person's screening tally: every distinct datum screened for them, in any of
    # their runs or dry runs (policy.screening.tally), and why it blocked them, if it did.
    screened_datums: Mapped[int] = mapped_column(Integer, default=0)
    flagged_datums: Mapped[int] = mapped_column(Integer, default=0)
    high_confidence_flags: Mapped[int] = mapped_column(Integer, default=0)
    screening_blocked_reason: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """A `tml-…` key, stored only as its SHA-256. `prefix` is the first characters, for
    display in listings; `created_by` the actor who issued it (as `enrolled_by`) and
    `created_via` how ("admin", "access_request", "operator", or "add_key" for a key
    added to an existing principal)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    scopes: Mapped[str] = mapped_column(Text, default="{}")
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_via: Mapped[str | None] = mapped_column(String(40))


ACCESS_REQUEST_STATES = ("pending", "approved", "rejected", "claimed")
OPEN_REQUEST_SQL = "status IN ('pending', 'approved')"


class AccessRequest(Base):
    """A researcher's request for a key. The requester holds a one-time claim token
    (stored as SHA-256) and exchanges it for the key once an admin approves. A name is held
    by at most one open (pending or approved) request."""

    __tablename__ = "access_requests"
    __table_args__ = (Index("uq_access_requests_open_name", "name", unique=True,
                            sqlite_where=text(OPEN_REQUEST_SQL),
                            postgresql_where=text(OPEN_REQUEST_SQL)),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    contact: Mapped[str] = mapped_column(String(300))
    purpose: Mapped[str] = mapped_column(Text)
    wanted_base_models: Mapped[str] = mapped_column(Text, default="[]")
    claim_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    role: Mapped[str] = mapped_column(String(20), default="researcher")
    scopes: Mapped[str] = mapped_column(Text, default="{}")
    expires_in_days: Mapped[int | None] = mapped_column(Integer)
    decided_by: Mapped[str | None] = mapped_column(String(200))  # actor id, as in audit
    decision_reason: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ClientSession(Base):
    """A Tinker SDK session (`create_session`)."""

    __tablename__ = "client_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    sdk_version: Mapped[str | None] = mapped_column(String(40))
    display_name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[str] = mapped_column(Text, default="[]")
    user_metadata: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finish_reason: Mapped[str | None] = mapped_column(String(40))


class TrainingRun(Base):
    """One LoRA adapter being trained; its id is the Tinker model id
    `{session_id}:train:{model_seq_id}`."""

    __tablename__ = "training_runs"
    __table_args__ = (UniqueConstraint("session_id", "model_seq_id"),)
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("client_sessions.id"))
    model_seq_id: Mapped[int] = mapped_column(Integer)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(300))
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_config: Mapped[str] = mapped_column(Text)
    user_metadata: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(20), default="creating")
    api_key_id: Mapped[str | None] = mapped_column(String(36), index=True)
    # Screening tally (policy.screening.tally): distinct datums screened, flagged and
    # flagged with high confidence so far (each datum counted once: ScreeningTallyDatum),
    # completions and affirmative openers; a run whose tally the policy judges harmful is
    # blocked for good (reason set).
    screened_datums: Mapped[int] = mapped_column(Integer, default=0)
    flagged_datums: Mapped[int] = mapped_column(Integer, default=0)
    high_confidence_flags: Mapped[int] = mapped_column(Integer, default=0)
    screened_completions: Mapped[int] = mapped_column(Integer, default=0)
    affirmative_openers: Mapped[int] = mapped_column(Integer, default=0)
    blocked_reason: Mapped[str | None] = mapped_column(Text)
    # Lineage: the checkpoint (and its run) the adapter was last loaded from; None for an
    # adapter created fresh. Every run its weights descend from is in `run_lineage`.
    parent_run_id: Mapped[str | None] = mapped_column(String(100))
    parent_checkpoint_id: Mapped[int | None] = mapped_column(Integer)
    # Durable state (engine.run_state): the seq_id of the job after which the weights and
    # AdamW state were snapshotted, and of the last job logged since (None: none). Written
    # by the worker only.
    durable_weights_seq: Mapped[int | None] = mapped_column(BigInteger)
    durable_log_seq: Mapped[int | None] = mapped_column(BigInteger)
    # The worker whose jobs these are while its lease lasts (renewed by its heartbeat).
    lease_worker_id: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_request_time: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )


class RunLineage(Base):
    """One run a training run's weights descend from (transitively): loading checkpoint
    `via_checkpoint_id` of `ancestor_run_id` (or of a run descending from it) brought its
    weights in. Written by policy.lineage only; never deleted."""

    __tablename__ = "run_lineage"
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"), primary_key=True)
    ancestor_run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"),
                                                 primary_key=True, index=True)
    via_checkpoint_id: Mapped[int] = mapped_column(Integer)
    via_tinker_path: Mapped[str] = mapped_column(String(400))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LineageHold(Base):
    """A quarantine that holds its run and every run descending from it: none of their
    checkpoints is evaluated or released while it stands. Recorded when a checkpoint is
    quarantined, lifted only by the two-person override of that checkpoint; it outlives
    the checkpoint (deleting quarantined weights does not free their descendants)."""

    __tablename__ = "lineage_holds"
    checkpoint_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    training_run_id: Mapped[str] = mapped_column(String(100), index=True)
    tinker_path: Mapped[str] = mapped_column(String(400))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    release_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lifted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    lifted_by: Mapped[str | None] = mapped_column(String(40))  # the override's id


class ScreeningTallyDatum(Base):
    """One distinct datum a training run's screening tally has counted (its SHA-256 over
    everything screening read in it), so a resubmitted datum is counted once."""

    __tablename__ = "screening_tally_datums"
    training_run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"),
                                                 primary_key=True)
    datum_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    high_confidence: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PrincipalTallyDatum(Base):
    """One distinct datum a person's screening tally has counted, wherever it was screened
    (a training run of theirs or a dry run), so that a datum is counted once per person."""

    __tablename__ = "principal_tally_datums"
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), primary_key=True)
    datum_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    high_confidence: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")


class Checkpoint(Base):
    """Adapter tensors (and optionally optimizer state) saved from a training run.
    `kind` is the middle segment of the tinker path; `name` the last. Ids are never
    reused (AUTOINCREMENT on SQLite, a sequence on PostgreSQL): release records, overrides
    and download links name checkpoints by id. `parent_checkpoint_id` is the checkpoint
    the run's adapter was last loaded from when this one was saved."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("training_run_id", "kind", "name"),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    training_run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"), index=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(200))
    tinker_path: Mapped[str] = mapped_column(String(400), unique=True)
    storage_dir: Mapped[str] = mapped_column(String(400))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    has_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    release_state: Mapped[str] = mapped_column(String(20), default="private")
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    publish_on_release: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_checkpoint_id: Mapped[int | None] = mapped_column(Integer)
    user_metadata: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # External weights exported with `age_encryption_recipients`: the recipients (a JSON
    # list) every download is encrypted to; None: served unencrypted.
    age_recipients: Mapped[str | None] = mapped_column(Text)


class Sampler(Base):
    """A sampling session: the base model alone, or base + a saved adapter
    (`checkpoint_id`, saved by run `parent_run_id`)."""

    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("client_sessions.id"))
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(300))
    model_path: Mapped[str | None] = mapped_column(String(400))
    checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL")
    )
    parent_run_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


FUTURE_STATES = ("pending", "running", "done", "failed")


class Future(Base):
    """The queue. A row is a submitted operation; the worker claims pending rows in
    `seq_id` order per training run and writes the result back. Resubmits of the same
    (model_id, seq_id) or (sampler_id, seq_id) map to the same row. Once delivered (or
    past the retention) its payloads are purged: `request_payload` empty, `result_payload`
    NULL, `request_format` "purged" and `result_format` why (audit.retention)."""

    __tablename__ = "futures"
    __table_args__ = (
        UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
        UniqueConstraint("sampler_id", "seq_id", name="uq_futures_sampler_seq"),
        Index("ix_futures_status_created", "status", "created_at"),
        Index("ix_futures_api_key_status", "api_key_id", "status"),
    )
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    model_id: Mapped[str | None] = mapped_column(String(100))
    sampler_id: Mapped[str | None] = mapped_column(String(100))
    seq_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    request_format: Mapped[str] = mapped_column(String(10), default="json")
    request_payload: Mapped[bytes] = mapped_column(LargeBinary)
    result_format: Mapped[str | None] = mapped_column(String(10))
    result_payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    error_message: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(20))
    worker_id: Mapped[str | None] = mapped_column(String(100))
    api_key_id: Mapped[str | None] = mapped_column(String(36))
    # What admission reserved against the key's quotas (JSON); settled once at completion.
    quota_reservation: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WorkerHeartbeat(Base):
    """A worker process that is, or was, draining the queue, and when it last said it is
    alive. Written by engine.worker only."""

    __tablename__ = "worker_heartbeats"
    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UsageCounter(Base):
    """Tokens used and still reserved, per API key, UTC day and training run ('' when
    the usage belongs to no run). Written by policy.quotas (reserve) and audit.usage
    (settle) only."""

    __tablename__ = "usage_counters"
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    training_run_id: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)
    training_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    training_tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    prefill_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    sampled_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    sampled_tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)


class ScreeningVerdict(Base):
    """A classifier's scores for one content hash: the cache every process shares, so the
    same text is never scored twice by the same classifier version."""

    __tablename__ = "screening_verdicts"
    content_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    classifier_version: Mapped[str] = mapped_column(String(120), primary_key=True)
    scores: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScreeningThreshold(Base):
    """The score at or above which a category flags a text; written by policy only."""

    __tablename__ = "screening_thresholds"
    category: Mapped[str] = mapped_column(String(120), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float)


class ReleaseRequest(Base):
    """One release evaluation of one checkpoint: why it was asked for, how far it got and
    what was decided. Written by the gateway (queued) and the worker (progress, decision)."""

    __tablename__ = "release_requests"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(Integer, index=True)
    tinker_path: Mapped[str] = mapped_column(String(400))
    training_run_id: Mapped[str] = mapped_column(String(100), index=True)
    principal_id: Mapped[str] = mapped_column(String(36), index=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    future_id: Mapped[str | None] = mapped_column(String(64))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_note: Mapped[str] = mapped_column(String(200), default="")
    report_id: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ReleaseReport(Base):
    """An evaluation report, stored as the canonical JSON its audited digest is over."""

    __tablename__ = "release_reports"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[str] = mapped_column(String(40), index=True)
    checkpoint_id: Mapped[int] = mapped_column(Integer, index=True)
    decision: Mapped[str] = mapped_column(String(20))
    report: Mapped[str] = mapped_column(Text)
    report_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvalResult(Base):
    """Cached per-item scores of one model (base or adapter, by checksum) on one suite."""

    __tablename__ = "eval_results"
    model_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    suite_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    runner_version: Mapped[str] = mapped_column(String(40), primary_key=True)
    scores: Mapped[str] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReleaseOverride(Base):
    """A two-person override of a quarantine: requested by one principal (an admin),
    approved by an independent one (an auditor). Bound to the checkpoint's content
    (`adapter_sha256`) and path; `status` pending → approved | cancelled (the checkpoint
    was deleted). The keys used for each half are kept: the two-person rule looks at who
    issued them."""

    __tablename__ = "release_overrides"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(Integer, index=True)
    tinker_path: Mapped[str] = mapped_column(String(400))
    status: Mapped[str] = mapped_column(String(20))
    requested_by: Mapped[str] = mapped_column(String(36))
    request_reason: Mapped[str] = mapped_column(Text)
    approved_by: Mapped[str | None] = mapped_column(String(36))
    approve_reason: Mapped[str | None] = mapped_column(Text)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    requested_key_id: Mapped[str | None] = mapped_column(String(36))
    approved_key_id: Mapped[str | None] = mapped_column(String(36))
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One row of the append-only, hash-chained audit log. Text columns are stored
    exactly as hashed (see audit.log)."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200), index=True)
    event_type: Mapped[str] = mapped_column(String(80), index=True)
    subject: Mapped[str] = mapped_column(String(400), default="")
    decision: Mapped[str] = mapped_column(String(20), index=True)
    request_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)
    mac: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64))
    hash_version: Mapped[int] = mapped_column(SmallInteger, default=1)


class PolicyRule(Base):
    """One casbin policy line (`p, sub, res, act, eft`). Written by policy.authz only."""

    __tablename__ = "policy_rules"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ptype: Mapped[str] = mapped_column(String(8))
    v0: Mapped[str] = mapped_column(String(256), default="")
    v1: Mapped[str] = mapped_column(String(256), default="")
    v2: Mapped[str] = mapped_column(String(256), default="")
    v3: Mapped[str] = mapped_column(String(256), default="")
    v4: Mapped[str] = mapped_column(String(256), default="")
    v5: Mapped[str] = mapped_column(String(256), default="")

    def values(self) -> list[str]:
        fields = [self.v0, self.v1, self.v2, self.v3, self.v4, self.v5]
        while fields and not fields[-1]:
            fields.pop()
        return fields
