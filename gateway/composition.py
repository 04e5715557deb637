"""The composition root: how the gateway's parts are built from `Settings`, in one place,
for `loragate serve` (gateway.state.build_state), `loragate worker` and every other CLI
command (gateway.cli, cli_release, cli_screening): the migrated database and its session
factories, the model registry, the screener, the release policy and its evaluator, the
audit checkpointer, and the worker wired with output screening and the release jobs.

Owns wiring only: no request handling, no policy rules, no model code. Heavy parts (the
worker, the release evaluator) are imported when built, so the API process does not load
the model stack at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from audit.db import make_engine, make_sessionmaker
from engine.host_memory import retain_freed_memory
from engine.registry import ModelRegistry
from gateway.checkpointer import Checkpointer
from gateway.settings import Settings
from migrations import upgrade_to_head
from policy.release import ReleasePolicy, load_release_policy
from policy.screening import metrics as screening_metrics
from policy.screening.screener import Screener
from policy.screening.screener import load_config as load_screening


def session_factory(settings: Settings, *, read_only: bool = False, url: str | None = None,
                    migrate: bool = True) -> sessionmaker[Session]:
    """Sessions on the database (`url`, else the settings'), migrated first unless the
    caller already did; a writer's sessions sign audit entries with the deployment's HMAC
    keys."""
    url = url or settings.database
    if migrate:
        upgrade_to_head(url)
    return make_sessionmaker(make_engine(url, read_only=read_only), settings.hmac_keys())


@contextlib.contextmanager
def database(settings: Settings, *, read_only: bool = False) -> Iterator[sessionmaker[Session]]:
    """`session_factory` for one command: its engine is disposed when the block ends."""
    factory = session_factory(settings, read_only=read_only)
    try:
        yield factory
    finally:
        factory.kw["bind"].dispose()


def model_registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(settings.data_dir, settings.extra_models)


def screener(settings: Settings, factory: sessionmaker[Session]) -> Screener:
    """The screening policy's classifiers (a required one that cannot load raises, naming
    the missing file)."""
    retain_freed_memory()  # the classifiers' tensors reuse freed memory (engine.host_memory)
    return Screener.build(load_screening(settings.screening_file), factory)


def release_policy(settings: Settings, *, calibrated: bool = True) -> ReleasePolicy:
    """The release policy, its suites loaded (a malformed policy, or one naming a suite
    with too few items, raises)."""
    from evals.release import load_suites

    policy = load_release_policy(settings.release_file, calibrated=calibrated)
    load_suites(policy)
    return policy


def checkpointer(settings: Settings, factory: sessionmaker[Session]) -> Checkpointer:
    return Checkpointer(factory, settings.checkpoint_dir, settings.signing_key())


def harm_version(screener: Screener) -> str:
    """The version of the release gate's harm judge: a digest of what judges its replies
    (the policy file's output thresholds, never an admin's run-time edit)."""
    judge = json.dumps(screener.output_judge(), sort_keys=True)
    return f"outputs@{hashlib.sha256(judge.encode()).hexdigest()[:16]}"


def release_evaluator(factory: sessionmaker[Session], policy: ReleasePolicy,
                      screener: Screener) -> Any:
    """The release evaluator, its generated replies judged at the policy file's output
    thresholds (`Screener.judge_outputs`, versioned by `harm_version`): an admin's run-time
    threshold edit changes what data screening and the output screen flag, never what the
    gate's suites count."""
    from evals.release import ReleaseEvaluator

    return ReleaseEvaluator(factory, policy, screener.judge_outputs,
                            lambda: harm_version(screener))


def worker(settings: Settings, factory: sessionmaker[Session], *, worker_id: str,
           registry: ModelRegistry | None = None, screen: Screener | None = None,
           checkpoints: Checkpointer | None = None, policy: ReleasePolicy | None = None,
           **options: Any) -> Any:
    """A worker wired with what the gateway owns: output screening and the release jobs
    (evaluations judged by the same screener; a signed audit checkpoint per decision).
    Parts not given are built from the settings."""
    from engine.worker import Worker
    from evals.release_jobs import ReleaseJobs

    screen = screen or screener(settings, factory)
    checkpoints = checkpoints or checkpointer(settings, factory)
    # The evaluator loads (and so checks) the policy's suites itself.
    evaluator = release_evaluator(factory, policy or load_release_policy(settings.release_file),
                                  screen)
    jobs = ReleaseJobs(factory, evaluator, on_decision=checkpoints.write)
    return Worker(factory, registry or model_registry(settings), settings.checkpoint_root,
                  worker_id=worker_id, device=settings.device,
                  batch_across_runs=settings.batch_across_runs,
                  output_screen=counted_output_screen(screen), extra_jobs=jobs.handlers(),
                  sweep_seconds=settings.checkpoint_sweep_seconds,
                  before_sweep_delete=cancel_overrides_of_expired, **options)


def counted_output_screen(screener: Screener) -> Callable[[list[str]], Any]:
    """The worker's output screen: the screener's, with each withheld output counted per
    category (policy.screening.metrics)."""
    def screen(texts: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        results = screener.flag_outputs(texts)
        screening_metrics.count_flags(screening_metrics.SAMPLED_OUTPUT,
                                      (flagged for flagged, _ in results))
        return results
    return screen


def cancel_overrides_of_expired(session: Session, ckpt: Any) -> None:
    """An expired checkpoint's pending release overrides are cancelled (audited) in the
    transaction that deletes it, as a user's delete does."""
    from evals.overrides import cancel_pending

    cancel_pending(session, ckpt, actor="sweeper",
                   reason="the checkpoint expired and was deleted")
