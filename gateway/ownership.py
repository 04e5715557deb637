"""Object lookups scoped to the calling principal: another principal's object, like a
missing one, is a 404. Reads of records (`read=True`) also find other principals'
objects when the policy grants `records, read_all` (auditors and admins by default);
writes never do. A checkpoint past its TTL is gone for everyone; a run whose session is
finished takes no more work. Also parses tinker:// paths."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import ColumnElement, or_, select

from audit.models import (
    CHECKPOINT_KINDS,
    Checkpoint,
    ClientSession,
    TrainingRun,
    as_utc,
    utcnow,
)
from gateway.context import RequestContext
from gateway.errors import BadRequest, NotFound
from policy.lineage import check_lineage_not_blocked
from policy.screening.tally import check_principal_not_blocked

T = TypeVar("T")

TINKER_SCHEME = "tinker://"


READ_ALL = ("records", "read_all")


def reads_all(ctx: RequestContext) -> bool:
    """May the caller read every principal's records (runs, checkpoints, sessions, usage)?"""
    return ctx.may(*READ_ALL)


MAX_PAGE = 1000


def mine_or_all(ctx: RequestContext, stmt: Any, model: Any) -> Any:
    """Listing: the caller's own rows, or everyone's for those who read all records."""
    return stmt if reads_all(ctx) else stmt.where(model.principal_id == ctx.principal.id)


def page(limit: int, offset: int) -> tuple[int, int]:
    """A listing's page bounds, checked."""
    if limit < 1 or limit > MAX_PAGE or offset < 0:
        raise BadRequest(f"limit must be 1..{MAX_PAGE} and offset >= 0")
    return limit, offset


def _visible(ctx: RequestContext, row: object | None, read: bool) -> bool:
    if row is None:
        return False
    return getattr(row, "principal_id", None) == ctx.principal.id or (read and reads_all(ctx))


def owned(ctx: RequestContext, model: type[T], key: object, what: str, *,
          read: bool = False) -> T:
    row = ctx.session.get(model, key)
    if row is None or not _visible(ctx, row, read):
        raise NotFound(f"{what} {key} not found")
    return row


def check_caller_not_blocked(ctx: RequestContext) -> None:
    """Refuse (403 run_blocked) a caller whom their screening tally has blocked: they start
    no run and no dry run until an admin reinstates them. Reads the caller's row as
    authentication loaded it for this request, leaving the request's session untouched (a
    dry run screens before it takes the database's write lock)."""
    check_principal_not_blocked(ctx.principal)


def owned_run(ctx: RequestContext, model_id: str) -> TrainingRun:
    """The caller's run, usable for training: not failed, its session not finished (a
    finished session's run holds no slot of concurrent_training_runs, so it takes no more
    work), and neither it nor any run its weights descend from blocked by screening."""
    run = owned(ctx, TrainingRun, model_id, "training run")
    if run.status == "failed":
        raise BadRequest(f"training run {model_id} failed to start; create a new one")
    check_session_open(ctx, run)
    check_lineage_not_blocked(ctx.session, run)
    return run


def check_session_open(ctx: RequestContext, run: TrainingRun) -> None:
    """Refuse (400) work on a run whose session (ServiceClient) was finished."""
    session = ctx.session.get(ClientSession, run.session_id)
    if session is None or session.finished_at is not None:
        raise BadRequest(
            f"training run {run.id} belongs to session {run.session_id}, which is finished: "
            "the run takes no more work. Start a new ServiceClient and create a new training "
            "client (create_training_client_from_state continues from a saved checkpoint)")


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """`tinker://{run}/{kind}/{name}` → (run, kind, name)."""
    if not path.startswith(TINKER_SCHEME):
        raise BadRequest(f"invalid tinker path {path!r}: expected tinker://run/kind/name")
    parts = path[len(TINKER_SCHEME):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
        raise BadRequest(
            f"invalid tinker path {path!r}: expected tinker://<run>/<kind>/<name> with kind one "
            f"of {', '.join(CHECKPOINT_KINDS)}"
        )
    return parts[0], parts[1], parts[2]


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"{TINKER_SCHEME}{run_id}/{kind}/{name}"


def storage_dir(run_id: str, kind: str, name: str) -> str:
    """Where a checkpoint lives under the checkpoint root (run ids contain ':')."""
    return f"{run_id.replace(':', '_')}/{kind}/{name}"


def owned_checkpoint(ctx: RequestContext, path: str, *, read: bool = False) -> Checkpoint:
    """The caller's (or, reading, a visible) checkpoint; an expired one is gone (404)."""
    run_id, kind, name = parse_tinker_path(path)
    ckpt = ctx.session.scalars(select(Checkpoint).where(
        Checkpoint.training_run_id == run_id, Checkpoint.kind == kind,
        Checkpoint.name == name)).first()
    if ckpt is None or not _visible(ctx, ckpt, read):
        raise NotFound(f"checkpoint {path} not found")
    check_not_expired(ckpt)
    return ckpt


def unexpired() -> ColumnElement[bool]:
    """The filter that leaves expired checkpoints out of listings."""
    return or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at > utcnow())


def check_not_expired(ckpt: Checkpoint) -> None:
    """An expired checkpoint is not listed, loaded, sampled or exported; the worker's
    sweeper deletes it (engine.sweeper)."""
    if ckpt.expires_at is not None and as_utc(ckpt.expires_at) <= utcnow():
        raise NotFound(f"checkpoint {ckpt.tinker_path} expired at "
                       f"{as_utc(ckpt.expires_at).isoformat()} (its ttl_seconds) and is gone")
