"""What a quarantined adapter may still do inside the gateway: the rule for its owner's
sampling.

Quarantine keeps the capability inside. A quarantined checkpoint is never exported,
published or downloaded (evals.release), never reaches another principal (the gateway's
ownership rule: another principal's weights are a 404 whatever their state or `public`
flag), and its owner samples it only where the release policy allows that (`[gate]
owner_may_sample_quarantined`, default false) — then within the key's caps, like any
sampler. The same holds for every checkpoint of a run that a standing quarantine holds
(policy.lineage: the quarantined checkpoint's run and the runs descending from it), so a
fresh snapshot of quarantined weights is not a way around it. A checkpoint whose release
evaluation runs is sampled by its owner only where the policy allows that too (`[gate]
owner_may_sample_evaluating`, default false). Must not import fastapi or gateway.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from audit.models import Checkpoint, TrainingRun
from evals.release import ReleaseRefused
from policy import lineage
from policy.release import ReleasePolicy

OVERRIDE = ("only a two-person override (an admin's request, a different auditor's "
            "approval) can release it")


def check_owner_may_sample(session: Session, ckpt: Checkpoint, run: TrainingRun | None,
                           policy: ReleasePolicy) -> None:
    """Refuse (ReleaseRefused, 403) sampling `ckpt` while its release evaluation runs, or
    when it is quarantined or held by a quarantine, unless the release policy lets owners
    sample such weights."""
    if ckpt.release_state == "evaluating" and not policy.owner_may_sample_evaluating:
        raise ReleaseRefused(f"{ckpt.tinker_path} is being evaluated for release, and the "
                             "release policy does not let its owner sample it meanwhile "
                             "([gate] owner_may_sample_evaluating = false); it can be sampled "
                             "again once the evaluation releases it")
    if policy.owner_may_sample_quarantined:
        return
    why = quarantine_of(session, ckpt, run)
    if why is not None:
        raise ReleaseRefused(f"{why}, and the release policy does not let its owner sample "
                             f"it ([gate] owner_may_sample_quarantined = false); {OVERRIDE}")


def quarantine_of(session: Session, ckpt: Checkpoint, run: TrainingRun | None) -> str | None:
    """Why `ckpt` counts as quarantined, or None when it does not."""
    if ckpt.release_state == "quarantined":
        return f"{ckpt.tinker_path} is quarantined"
    held = lineage.standing_hold(session, run.id) if run is not None else None
    if held is None or run is None:
        return None
    return (f"{ckpt.tinker_path} is held by the quarantine of {held.tinker_path} (the weights "
            f"of training run {run.id} are those weights or descend from them)")
