"""Release of adapter checkpoints: the state machine, the evaluation the worker runs, and
the decision record.

A checkpoint's release state goes `private → evaluating → released | quarantined`
(`evaluating → private` when an evaluation breaks; `quarantined → released` only through
the two-person override, evals.overrides). A quarantine also holds the checkpoint's run and
every run descending from it (policy.lineage): their weights are not evaluated, released
or let out (exported, published, downloaded — released checkpoints included) while it
stands, and weights that descend from blocked weights never are. Every transition
appends its audit row before the state column changes, in the same transaction, so no
state is ever visible without its record. For each decision the trail reads: the request,
`release.state` → evaluating, `release.report` (the report's digest), `release.decision`,
`release.state` → the outcome; after the commit a signed audit checkpoint is written.

The worker runs the evaluation with the base model it already holds (jobs
`save_weights_external` — the SDK's export, which resolves only once decided — and
`release_eval` for publish and explicit requests), records progress on the request row,
stops at the policy's time budget, and caches per-item scores by (model checksum, suite
hash). Must not import fastapi or gateway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import (
    Checkpoint,
    EvalResult,
    ReleaseRequest,
    TrainingRun,
)
from engine.queue import enqueue
from evals import gate, probes
from evals.judges import RefusalJudge
from evals.suites import SUITES_DIR, MultipleChoiceSuite, PromptSuite, Suite, load_suite
from policy import lineage, quotas
from policy.digest import files_sha256
from policy.errors import PolicyError
from policy.release import ReleasePolicy, ReleasePolicyError, SuiteRule
from policy.scopes import Scopes

if TYPE_CHECKING:
    from engine.backend import Backend

logger = logging.getLogger("loragate.release")

STATES = ("private", "evaluating", "released", "quarantined")
TRANSITIONS = {("private", "evaluating"), ("evaluating", "released"),
               ("evaluating", "quarantined"), ("evaluating", "private"),
               ("quarantined", "released")}
REPORT_FORMAT = "loragate-release-report/1"
PROBES_VERSION = f"probes-2-a{probes.ANSWER_TOKENS}"
RELEASE_JOB = "release_eval"
EXPORT_JOB = "save_weights_external"


class ReleaseRefused(PolicyError):
    """A release, export, publish, download or override the gate does not allow (403)."""


class BudgetExceeded(Exception):
    """The evaluation ran past the policy's time budget."""


# ---------------------------------------------------------------------- state machine

def transition(session: Session, ckpt: Checkpoint, to: str, *, actor: str, reason: str,
               request_id: str = "", **payload: Any) -> None:
    """Move `ckpt` to state `to`: the audit row first, then the state, one transaction."""
    frm = ckpt.release_state
    if (frm, to) not in TRANSITIONS:
        raise ReleaseRefused(f"{ckpt.tinker_path} is {frm}; it cannot become {to}")
    audit_log.append(session, actor=actor, event_type="release.state", decision=to,
                     subject=ckpt.tinker_path, request_id=request_id,
                     payload={"from": frm, "to": to, "reason": reason,
                              "checkpoint_id": ckpt.id, **payload})
    ckpt.release_state = to
    if to == "released" and ckpt.publish_on_release:
        ckpt.public = True
    if to == "quarantined":  # the quarantine holds the run and its descendants
        lineage.hold(session, ckpt, release_id=payload.get("release_id"))
    session.flush()


def require_released(ckpt: Checkpoint, what: str) -> None:
    """Only released checkpoints leave: say what state it is in and what to do."""
    if ckpt.release_state == "released":
        return
    advice = {
        "private": "request its release evaluation first (POST /api/v1/releases or "
                   "`loragate release request`), or export it with save_weights_external",
        "evaluating": "its release evaluation is still running; try again once it is decided",
        "quarantined": "the release evaluation quarantined it; only a two-person override "
                       "(an admin's request, a different auditor's approval) can release it",
    }[ckpt.release_state]
    raise ReleaseRefused(f"{ckpt.tinker_path} is {ckpt.release_state} and cannot be {what}: "
                         f"{advice}")


def check_may_leave(session: Session, ckpt: Checkpoint, what: str) -> None:
    """Weights leave (downloaded, published, given download links) only when released,
    not descended from blocked weights and not held by a standing quarantine: a block or
    a quarantine of the run (or of a run it descends from) that came after the release
    still stops them."""
    require_released(ckpt, what)
    run = session.get(TrainingRun, ckpt.training_run_id)
    if run is None:
        raise ReleaseRefused(f"the training run of {ckpt.tinker_path} no longer exists; its "
                             f"weights cannot be {what}")
    check_releasable(session, run, ckpt, what)


def lineage_objection(session: Session, run: TrainingRun, ckpt: Checkpoint | None = None
                      ) -> str | None:
    """Why weights of `run` may not be evaluated or released because of where they come
    from (policy.lineage), or None: the run or a run it descends from is blocked by
    screening, or a quarantine holds it (other than `ckpt`'s own)."""
    try:
        check_releasable(session, run, ckpt)
    except PolicyError as objection:
        return str(objection)
    return None


def _hold_objection(session: Session, run: TrainingRun, ckpt: Checkpoint | None
                    ) -> str | None:
    held = lineage.standing_hold(session, run.id,
                                 exclude_checkpoint_id=ckpt.id if ckpt is not None else None)
    if held is None:
        return None
    return (f"the weights of training run {run.id} are or descend from those of "
            f"{held.tinker_path}, which is quarantined; none of them is evaluated, exported, "
            "published, downloaded or released until that checkpoint is released by the "
            "two-person override")


def check_releasable(session: Session, run: TrainingRun, ckpt: Checkpoint | None = None,
                     verb: str = "released") -> None:
    """Refuse evaluating, exporting, releasing or letting out weights of `run` when they
    descend from blocked weights (RunBlocked) or a quarantine holds them (ReleaseRefused);
    `ckpt`'s own quarantine does not count as a hold on itself."""
    lineage.check_lineage_not_blocked(session, run, verb)
    objection = _hold_objection(session, run, ckpt)
    if objection is not None:
        raise ReleaseRefused(objection)


def live_request(session: Session, ckpt: Checkpoint) -> ReleaseRequest | None:
    return session.scalars(select(ReleaseRequest).where(
        ReleaseRequest.checkpoint_id == ckpt.id,
        ReleaseRequest.status.in_(("queued", "evaluating")))).first()


def queue_release(session: Session, ckpt: Checkpoint, run: TrainingRun, *, trigger: str,
                  actor: str, request_id: str = "", api_key_id: str | None = None,
                  scopes: Scopes | None = None) -> ReleaseRequest:
    """Queue the evaluation of a private checkpoint (or return the one already queued).
    A run blocked by screening is never evaluated or released. Queued through an API key
    (with its `scopes`), a new evaluation counts against the key's release evaluations
    per day."""
    check_releasable(session, run, ckpt)
    if ckpt.release_state == "released":
        raise ReleaseRefused(f"{ckpt.tinker_path} is already released")
    if ckpt.release_state == "quarantined":
        # A decided quarantine is not re-rolled by asking again; the refusal names the
        # two-person override as the only way out.
        require_released(ckpt, "evaluated again")
    existing = live_request(session, ckpt)
    if existing is not None:
        return existing
    reservation = None
    if api_key_id is not None and scopes is not None:
        reservation = quotas.reserve(session, api_key_id, scopes, quotas.Charge(
            release_evaluation=True, training_run_id=run.id)).to_json()
    release = ReleaseRequest(
        id=f"rel-{uuid.uuid4().hex[:20]}", checkpoint_id=ckpt.id, tinker_path=ckpt.tinker_path,
        training_run_id=run.id, principal_id=ckpt.principal_id, requested_by=actor,
        trigger=trigger, status="queued")
    release.future_id = enqueue(session, kind=RELEASE_JOB, principal_id=ckpt.principal_id,
                                payload=json.dumps({"release_id": release.id}).encode(),
                                api_key_id=api_key_id, quota_reservation=reservation
                                ).request_id
    session.add(release)
    audit_log.append(session, actor=actor, event_type="release.requested", decision="queued",
                     subject=ckpt.tinker_path, request_id=request_id,
                     payload={"release_id": release.id, "trigger": trigger,
                              "future": release.future_id, "checkpoint_id": ckpt.id})
    session.flush()
    return release


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class LoadedSuite:
    rule: SuiteRule
    suite: Suite

    @property
    def kind(self) -> str:
        return "multiple_choice" if isinstance(self.suite, MultipleChoiceSuite) \
            else self.suite.kind

    def item_count(self) -> int:
        if isinstance(self.suite, PromptSuite) and self.suite.kind == "refusal":
            return len(self.suite.labelled("harmful"))
        return len(self.suite.items)


def resolve_suite_file(policy: ReleasePolicy, name: str) -> Path:
    path = Path(name)
    if path.is_absolute():
        return path
    beside = policy.source.parent / path
    return beside if beside.is_file() else SUITES_DIR / path


def load_suites(policy: ReleasePolicy) -> list[LoadedSuite]:
    """The policy's suites, each checked against its minimum item count."""
    loaded = []
    for rule in policy.suites:
        suite = LoadedSuite(rule, load_suite(resolve_suite_file(policy, rule.file)))
        if suite.item_count() < rule.min_items:
            raise ReleasePolicyError(
                f"suite {rule.name} ({rule.file}) has {suite.item_count()} items; the release "
                f"policy requires at least {rule.min_items}")
        loaded.append(suite)
    return loaded


Progress = Callable[[int, int, str], None]


class ReleaseEvaluator:
    """Runs the policy's suites on the base and the base+adapter and decides."""

    def __init__(self, factory: sessionmaker[Session], policy: ReleasePolicy,
                 harm: probes.HarmJudge, harm_version: Callable[[], str]) -> None:
        self.factory, self.policy = factory, policy
        self.suites = load_suites(policy)
        self.harm, self.harm_version = harm, harm_version
        self.judge = RefusalJudge()
        self.judge_quality = self.judge.measure()
        self._base_sha: dict[str, str] = {}

    def base_sha256(self, backend: Backend, model_dir: Path) -> str:
        name = backend.info.name
        if name not in self._base_sha:
            self._base_sha[name] = files_sha256(sorted(model_dir.glob("*.safetensors")))
        return self._base_sha[name]

    def evaluate(self, backend: Backend, adapter_id: str, base_sha: str, adapter_sha: str,
                 progress: Progress) -> dict[str, Any]:
        """Every suite, base and adapter; returns the report body (without ids)."""
        started = time.monotonic()
        deadline = started + self.policy.time_budget_seconds
        harm_version = self.harm_version()
        views = {
            "base": (probes.ModelView(backend, None, max_new_tokens=self.policy.max_new_tokens,
                                      seed=self.policy.seed), base_sha),
            "adapter": (probes.ModelView(backend, adapter_id,
                                         max_new_tokens=self.policy.max_new_tokens,
                                         seed=self.policy.seed),
                        _sha(f"{base_sha}:{adapter_sha}")),
        }
        verdicts, cache_hits, stopped = [], 0, None
        total = 2 * len(self.suites)
        for n, loaded in enumerate(self.suites):
            scores = {}
            scorer = _runner_version(loaded.kind, self.policy, self.judge.version, harm_version)
            try:
                for k, (which, (view, model_sha)) in enumerate(views.items()):
                    progress(2 * n + k, total, f"{loaded.rule.name}: {which}")
                    if time.monotonic() > deadline:
                        raise BudgetExceeded(loaded.rule.name)
                    scores[which], hit = self._scores(loaded, view, model_sha, scorer)
                    cache_hits += hit
            except BudgetExceeded:
                stopped = loaded.rule.name
                break
            rule = self.policy.rule_for(loaded.rule, backend.info.name, base_sha,
                                        loaded.suite.sha256, scorer)
            verdict = gate.compare(rule, loaded.kind, loaded.suite.sha256,
                                   scores["base"]["items"], scores["adapter"]["items"],
                                   _extra(loaded, scores))
            verdicts.append(replace(verdict, scorer=scorer))
        progress(total, total, "deciding")
        decision, reasons = gate.decide(verdicts, self.policy.alpha)
        done = {v.name for v in verdicts}
        not_run = [_not_run(loaded) for loaded in self.suites if loaded.rule.name not in done]
        if stopped is not None:
            decision = "quarantined"
            reasons.append(f"time budget of {self.policy.time_budget_seconds:g} s exceeded "
                           f"before suite {stopped} finished")
        return {
            "format": REPORT_FORMAT, "decision": decision, "reasons": reasons,
            "base_sha256": base_sha, "adapter_sha256": adapter_sha,
            "policy": {"sha256": self.policy.sha256, "alpha": self.policy.alpha,
                       "time_budget_seconds": self.policy.time_budget_seconds,
                       "max_new_tokens": self.policy.max_new_tokens,
                       "seed": self.policy.seed, "decoding": "greedy",
                       "calibration": _calibration_ref(self.policy)},
            "judges": {"refusal": {"version": self.judge.version,
                                   "quality": self.judge_quality.to_dict()},
                       "harm": {"version": harm_version,
                                "what": "the screening classifiers, the policy file's output "
                                        "thresholds"}},
            "suites": [v.to_dict() for v in verdicts] + not_run,
            "cache_hits": cache_hits, "seconds": round(time.monotonic() - started, 2),
        }

    def _scores(self, loaded: LoadedSuite, view: probes.ModelView, model_sha: str,
                runner: str) -> tuple[dict[str, Any], int]:
        with transaction(self.factory) as session:
            cached = session.get(EvalResult, (model_sha, loaded.suite.sha256, runner))
            if cached is not None:
                return json.loads(cached.scores), 1
        started = time.monotonic()
        scores = self._run(loaded, view)
        with transaction(self.factory) as session:
            if session.get(EvalResult, (model_sha, loaded.suite.sha256, runner)) is None:
                session.add(EvalResult(model_sha256=model_sha, suite_sha256=loaded.suite.sha256,
                                       runner_version=runner, scores=json.dumps(scores),
                                       seconds=time.monotonic() - started))
        return scores, 0

    def _run(self, loaded: LoadedSuite, view: probes.ModelView) -> dict[str, Any]:
        suite = loaded.suite
        if isinstance(suite, MultipleChoiceSuite):
            return {"items": probes.multiple_choice(view, suite),
                    "canaries": probes.canary_exposure(view, suite, self.policy.seed)}
        if suite.kind == "compliance_shift":
            return {"items": probes.compliance_shift(view, suite)}
        if suite.kind == "refusal":
            return {"items": probes.refusal(view, suite, self.judge)}
        if suite.kind == "answer_shift":
            return {"items": probes.answer_shift(view, suite)}
        if suite.kind == "prefill":
            return {"items": probes.prefill(view, suite, self.harm)}
        return {"items": probes.generation(view, suite, self.harm)}


def _calibration_ref(policy: ReleasePolicy) -> dict[str, Any] | None:
    """The calibration the tolerances came from, as every report cites it."""
    calibration = policy.calibration
    if calibration is None:
        return None
    return {"file": calibration.path.name, "sha256": calibration.sha256,
            "data_manifest_sha256": calibration.data_manifest_sha256}


def _runner_version(kind: str, policy: ReleasePolicy, judge: str, harm: str) -> str:
    judged_by = {"refusal": judge, "prefill": harm, "generation": harm}.get(kind, "")
    settings = f"{PROBES_VERSION}:{kind}:{policy.max_new_tokens}:{policy.seed}:{judged_by}"
    return f"{PROBES_VERSION}-{_sha(settings)[:24]}"


def _extra(loaded: LoadedSuite, scores: dict[str, Any]) -> dict[str, Any]:
    if loaded.kind != "multiple_choice":
        return {}
    base, adapter = scores["base"]["canaries"], scores["adapter"]["canaries"]
    return {"canaries": [{"canary_sha256": b["canary_sha256"], "candidates": b["candidates"],
                          "base_exposure_bits": round(b["exposure_bits"], 3),
                          "adapter_exposure_bits": round(a["exposure_bits"], 3)}
                         for b, a in zip(base, adapter, strict=True)]}


def _not_run(loaded: LoadedSuite) -> dict[str, Any]:
    return {"name": loaded.rule.name, "kind": loaded.kind, "sha256": loaded.suite.sha256,
            "gating": loaded.rule.gating, "status": gate.NOT_RUN}


def canonical(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=True, separators=(",", ":"), default=float)
