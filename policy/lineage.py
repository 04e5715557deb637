"""Weight lineage: which training runs a run's adapter descends from, and what follows
the weights into every descendant — a screening block, the screening tally and a
quarantine.

The rule:

- **Edges.** Loading a checkpoint into a run (`create_training_client_from_state`, or
  `load_state` on a live run) makes that run a descendant of the checkpoint's run and of
  every run that run descended from at that moment; `run_lineage` keeps these edges for
  good, and the run records the checkpoint as its parent. A checkpoint records the
  checkpoint its run was loaded from when it was saved, a sampler the run whose weights it
  samples.
- **Blocks follow the weights.** A run is blocked when it, or any run it descends from, is
  blocked by screening — or whose owner is (policy.screening.tally: a person's own
  tally) — checked at every use, so a block that comes after the child was made still
  reaches it. Loading, training, sampling or releasing such weights is refused.
- **The tally follows the weights.** A loading run takes the source run's screening tally
  into its own (the distinct datum digests with their flags, once per datum; the
  completion and opener counts once per source run) and is judged on the sum, so a
  harmful dataset split across a chain of runs is counted as one.
- **Quarantines hold the lineage.** A quarantined checkpoint holds its own run and every
  run descending from it (`lineage_holds`): none of their checkpoints is evaluated,
  exported, published or released by override while the hold stands. Only the two-person
  override of the quarantined checkpoint itself lifts it; deleting the checkpoint does
  not. (Judged per run, so a run's checkpoints saved before the quarantine are held too:
  the rule errs on the side of holding.)

Must not import fastapi, engine or evals.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import (
    Checkpoint,
    LineageHold,
    Principal,
    RunLineage,
    ScreeningTallyDatum,
    TrainingRun,
    utcnow,
)
from policy.screening.screener import ScreeningConfig
from policy.screening.tally import (
    Block,
    RunBlocked,
    block_if_due,
    check_not_blocked,
    check_principal_not_blocked,
    lock_run,
)


def ancestor_ids(session: Session, run_id: str) -> list[str]:
    """Every run `run_id`'s weights descend from (not the run itself)."""
    return list(session.scalars(select(RunLineage.ancestor_run_id)
                                .where(RunLineage.run_id == run_id)))


def blocked_ancestor(session: Session, run_id: str
                     ) -> tuple[TrainingRun, str, str] | None:
    """A run that `run_id` descends from and that is blocked, itself or through its
    owner's block: the run, the checkpoint path it came through and the reason; None when
    there is none."""
    found = session.execute(
        select(TrainingRun, RunLineage.via_tinker_path, Principal.screening_blocked_reason)
        .join(RunLineage, RunLineage.ancestor_run_id == TrainingRun.id)
        .join(Principal, Principal.id == TrainingRun.principal_id)
        .where(RunLineage.run_id == run_id,
               or_(TrainingRun.blocked_reason.is_not(None),
                   Principal.screening_blocked_reason.is_not(None)))
        .limit(1)).first()
    if found is None:
        return None
    run, via, owner_reason = found
    return run, via, run.blocked_reason or f"its owner is blocked: {owner_reason}"


def check_lineage_not_blocked(session: Session, run: TrainingRun, verb: str = "used") -> None:
    """Refuse (RunBlocked) a run that is blocked itself, whose owner is blocked, or that
    descends from such a run."""
    check_not_blocked(run)
    owner = session.get(Principal, run.principal_id)
    if owner is not None:
        check_principal_not_blocked(owner)
    found = blocked_ancestor(session, run.id)
    if found is None:
        return
    ancestor, via, reason = found
    raise RunBlocked(
        f"training run {run.id} descends from run {ancestor.id} (through {via}), which is "
        f"blocked by screening ({reason}); weights that descend from "
        f"blocked weights cannot be {verb}, trained, sampled or released. Start a new run "
        "from scratch with data that passes screening")


def standing_hold(session: Session, run_id: str, *, exclude_checkpoint_id: int | None = None,
                  for_override: bool = False) -> LineageHold | None:
    """A quarantine that holds run `run_id`: one of its own or of a run it descends from,
    not lifted. For an override of one of the run's own checkpoints (`for_override`), only
    holds from runs strictly upstream count: each quarantine of the same run (or of a run
    that also descends from it) is overridden on its own."""
    runs = [run_id, *ancestor_ids(session, run_id)]
    if for_override:
        downstream = set(session.scalars(select(RunLineage.run_id).where(
            RunLineage.ancestor_run_id == run_id)))
        runs = [r for r in runs if r != run_id and r not in downstream]
    if not runs:
        return None
    stmt = select(LineageHold).where(LineageHold.training_run_id.in_(runs),
                                     LineageHold.lifted_at.is_(None))
    if exclude_checkpoint_id is not None:
        stmt = stmt.where(LineageHold.checkpoint_id != exclude_checkpoint_id)
    return session.scalars(stmt.order_by(LineageHold.created_at).limit(1)).first()


def hold(session: Session, ckpt: Checkpoint, *, release_id: str | None) -> None:
    """A checkpoint was quarantined: hold its run and the run's descendants."""
    if session.get(LineageHold, ckpt.id) is None:
        session.add(LineageHold(checkpoint_id=ckpt.id, training_run_id=ckpt.training_run_id,
                                tinker_path=ckpt.tinker_path,
                                adapter_sha256=ckpt.adapter_sha256, release_id=release_id))
        session.flush()


def lift(session: Session, ckpt: Checkpoint, *, override_id: str) -> None:
    """The two-person override released the quarantined checkpoint: its hold ends."""
    row = session.get(LineageHold, ckpt.id)
    if row is not None and row.lifted_at is None:
        row.lifted_at, row.lifted_by = utcnow(), override_id


def record_load(session: Session, *, child: TrainingRun, source: Checkpoint,
                source_run: TrainingRun, config: ScreeningConfig, actor: str,
                request_id: str = "") -> Block | None:
    """`child` loads checkpoint `source` (of `source_run`): refuse blocked weights, record
    the edges and the parent, take in the source's tally (audited as `lineage.load`) and
    block the child if the sum calls for it. Returns the block this caused, if any."""
    check_lineage_not_blocked(session, source_run, "loaded")
    if child.id == source_run.id:  # a run restoring its own checkpoint: nothing new
        return None
    child = lock_run(session, child.id)  # before the audit row (the order requests lock in)
    added = _add_edges(session, child.id, source, source_run.id)
    merged = _merge_tally(session, child, source_run, first=source_run.id in added)
    child.parent_run_id, child.parent_checkpoint_id = source_run.id, source.id
    audit_log.append(session, actor=actor, event_type="lineage.load", decision="info",
                     subject=child.id, request_id=request_id,
                     payload={"parent_run": source_run.id, "parent_checkpoint_id": source.id,
                              "parent_checkpoint": source.tinker_path,
                              "parent_adapter_sha256": source.adapter_sha256,
                              "ancestors_added": sorted(added), "tally_merged": merged})
    return block_if_due(session, child, config, actor=actor, request_id=request_id,
                        inherited_from=source_run.id)


def _add_edges(session: Session, child_id: str, source: Checkpoint, parent_id: str
               ) -> set[str]:
    """Edges from `child_id` to the source's run and to everything that run descends from
    (keeping each ancestor's original checkpoint); returns the ancestors newly added."""
    have = set(ancestor_ids(session, child_id))
    wanted: dict[str, tuple[int, str]] = {parent_id: (source.id, source.tinker_path)}
    upstream = session.execute(select(RunLineage.ancestor_run_id, RunLineage.via_checkpoint_id,
                                      RunLineage.via_tinker_path)
                               .where(RunLineage.run_id == parent_id)).all()
    for ancestor, via_id, via_path in upstream:
        wanted.setdefault(ancestor, (via_id, via_path))
    added = {a for a in wanted if a not in have and a != child_id}
    for ancestor in sorted(added):
        via_id, via_path = wanted[ancestor]
        session.add(RunLineage(run_id=child_id, ancestor_run_id=ancestor,
                               via_checkpoint_id=via_id, via_tinker_path=via_path))
    session.flush()
    return added


def _merge_tally(session: Session, child: TrainingRun, source: TrainingRun, *, first: bool
                 ) -> dict[str, Any]:
    """Add the source run's distinct datums (with their flags) to the child's tally; the
    source's completion and opener counts too the first time the child loads from it."""
    theirs = session.execute(select(ScreeningTallyDatum.datum_sha256,
                                    ScreeningTallyDatum.flagged,
                                    ScreeningTallyDatum.high_confidence)
                             .where(ScreeningTallyDatum.training_run_id == source.id)).all()
    mine = {row.datum_sha256: row for row in session.scalars(select(ScreeningTallyDatum).where(
        ScreeningTallyDatum.training_run_id == child.id))}
    new = new_flagged = new_high = 0
    for digest, flagged, high in theirs:
        row = mine.get(digest)
        if row is None:
            session.add(ScreeningTallyDatum(training_run_id=child.id, datum_sha256=digest,
                                            flagged=flagged, high_confidence=high))
            new, new_flagged, new_high = new + 1, new_flagged + flagged, new_high + high
            continue
        if flagged and not row.flagged:
            row.flagged, new_flagged = True, new_flagged + 1
        if high and not row.high_confidence:
            row.high_confidence, new_high = True, new_high + 1
    child.screened_datums += new
    child.flagged_datums += new_flagged
    child.high_confidence_flags += new_high
    if first:
        child.affirmative_openers += source.affirmative_openers
        child.screened_completions += source.screened_completions
    session.flush()
    return {"datums": new, "flagged": new_flagged, "high_confidence": new_high,
            "openers_and_completions": first}
