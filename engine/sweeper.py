"""Expired checkpoints: once past their TTL (`Checkpoint.expires_at`, set from a save's
`ttl_seconds` or a later `PUT …/ttl`), a checkpoint is deleted — its row together with an
audit row, in one transaction, and its files once that has committed.

Run periodically by the worker (`Worker(sweep_seconds=…)`) and on demand by `loragate
checkpoints sweep`. A checkpoint under release evaluation waits for the decision. Until
it is swept, the gateway already treats an expired checkpoint as gone. Must not import
fastapi, gateway or policy.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import Checkpoint, as_utc, utcnow

logger = logging.getLogger("loragate.sweeper")

# Called in the deleting transaction, before a checkpoint's row goes (the composition root
# cancels its pending release overrides there).
BeforeDelete = Callable[[Session, Checkpoint], None]

SWEEP_BATCH = 500


def sweep_expired_checkpoints(factory: sessionmaker[Session], checkpoint_root: Path, *,
                              actor: str, now: dt.datetime | None = None,
                              before_delete: BeforeDelete | None = None) -> list[str]:
    """Delete up to SWEEP_BATCH expired checkpoints (rows, audit rows, then files) and
    return their tinker paths. Concurrent sweepers skip each other's rows."""
    now = now or utcnow()
    with transaction(factory) as session:
        expired = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.expires_at.is_not(None), Checkpoint.expires_at <= now,
                   Checkpoint.release_state != "evaluating")
            .order_by(Checkpoint.expires_at, Checkpoint.id).limit(SWEEP_BATCH)
            .with_for_update(skip_locked=True)).all()
        gone = [(ckpt.tinker_path, Path(checkpoint_root) / ckpt.storage_dir) for ckpt in expired]
        for ckpt in expired:
            if before_delete is not None:
                before_delete(session, ckpt)
            _delete(session, ckpt, actor)
    for path, directory in gone:  # files go only once the rows are gone for good
        shutil.rmtree(directory, ignore_errors=True)
        logger.info("swept expired checkpoint %s", path)
    return [path for path, _ in gone]


def _delete(session: Session, ckpt: Checkpoint, actor: str) -> None:
    expires_at = as_utc(ckpt.expires_at).isoformat() if ckpt.expires_at else None
    audit_log.append(session, actor=actor, event_type="checkpoint.expired", decision="delete",
                     subject=ckpt.tinker_path,
                     payload={"checkpoint_id": ckpt.id, "training_run_id": ckpt.training_run_id,
                              "owner": ckpt.principal_id, "expires_at": expires_at,
                              "size_bytes": ckpt.size_bytes,
                              "release_state": ckpt.release_state})
    session.delete(ckpt)
    session.flush()
