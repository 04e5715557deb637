"""Durable run state: each training run's adapter, AdamW state and pending gradients can be
rebuilt from disk, so that a worker that dies (even `kill -9`) or a different worker carries
the run on exactly where its last committed job left it.

A snapshot plus a log, under the checkpoint root (a dot-folder no tinker path can name):

    .run-state/<run id>/weights-<seq>/        snapshot: the adapter and its AdamW state (an
                                              adapter checkpoint directory, engine.checkpoints)
                                              after the create, load or optim_step job `seq`
    .run-state/<run id>/log-<seq>.<kind>      a job since that snapshot that changed the run
                                              (kind forward_backward or optim_step), as the
                                              request bytes the worker ran

Restoring loads the snapshot and runs the logged jobs again in seq order (replay: the same
inputs on the same weights give the same gradients and steps). Logging a job costs a few
kilobytes; a snapshot (megabytes) is taken at most every few optimizer steps, which bounds
the replay.

`DurableState` names one state by the snapshot's seq_id and the last logged seq_id. The
worker writes the files before a job's result commits and records the pair on the run's row
in that same transaction, so the row always names complete files; a crash between the write
and the commit leaves newer files that nothing names, which replay ignores and pruning
removes.

Owns the paths and the file formats. Must not import the database layer (the worker keeps
the pair on the run's row) nor decode requests (the worker replays them).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.backend import Backend

logger = logging.getLogger("loragate.worker")

STATE_DIR = ".run-state"
LOGGED_KINDS = ("forward_backward", "optim_step")


@dataclass(frozen=True)
class DurableState:
    """The snapshot after job `weights_seq`, plus the logged jobs after it up to `log_seq`
    (None: none)."""

    weights_seq: int
    log_seq: int | None = None


@dataclass(frozen=True)
class LoggedJob:
    seq: int
    kind: str
    payload: bytes


def run_dir(root: Path, run_id: str) -> Path:
    return Path(root) / STATE_DIR / run_id.replace(":", "_")


def weights_dir(root: Path, run_id: str, seq: int) -> Path:
    return run_dir(root, run_id) / f"weights-{seq}"


def snapshot(backend: Backend, root: Path, run_id: str, seq: int) -> DurableState:
    """After job `seq` set the weights (create, load, optim_step): no gradient is pending."""
    backend.save_adapter(run_id, weights_dir(root, run_id, seq), with_optimizer=True)
    return DurableState(seq)


def log_job(root: Path, run_id: str, state: DurableState, seq: int, kind: str,
            payload: bytes) -> DurableState:
    """Append job `seq` (what the worker ran) to the log after `state`."""
    if kind not in LOGGED_KINDS:
        raise ValueError(f"cannot log a {kind!r} job")
    path = run_dir(root, run_id) / f"log-{seq}.{kind}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # a process crash keeps written pages; no fsync needed for that
    return DurableState(state.weights_seq, seq)


def logged_jobs(root: Path, run_id: str, state: DurableState) -> Iterator[LoggedJob]:
    """The jobs `state` names after its snapshot, in seq order."""
    for seq, kind, path in _named_log(root, run_id, state):
        yield LoggedJob(seq, kind, path.read_bytes())


def logged_steps(root: Path, run_id: str, state: DurableState) -> int:
    """How many optimizer steps replaying `state` would take."""
    return sum(1 for _, kind, _ in _named_log(root, run_id, state) if kind == "optim_step")


def load_snapshot(backend: Backend, root: Path, run_id: str, state: DurableState) -> None:
    """Load the snapshot of `state` as adapter `run_id` (replacing what the backend held)."""
    backend.load_adapter(run_id, weights_dir(root, run_id, state.weights_seq),
                         with_optimizer=True)


def prune(root: Path, run_id: str, keep: DurableState) -> None:
    """Remove the run's files that `keep` does not name (older ones, and newer ones a crash
    left behind). Best effort: a file left over is removed next time."""
    directory = run_dir(root, run_id)
    if not directory.is_dir():
        return
    wanted = {weights_dir(root, run_id, keep.weights_seq).name}
    wanted |= {path.name for _, _, path in _named_log(root, run_id, keep)}
    for path in directory.iterdir():
        if path.name in wanted:
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            logger.warning("could not prune durable state file %s", path)


def _named_log(root: Path, run_id: str, state: DurableState) -> list[tuple[int, str, Path]]:
    """(seq, kind, path) of the log files `state` names (after its snapshot, up to its
    last logged job), in seq order; files a crash left beyond it are not among them."""
    directory = run_dir(root, run_id)
    if state.log_seq is None or not directory.is_dir():
        return []
    named = []
    for path in directory.glob("log-*.*"):
        seq, _, kind = path.name[len("log-"):].partition(".")
        if seq.isdigit() and kind in LOGGED_KINDS \
                and state.weights_seq < int(seq) <= state.log_seq:
            named.append((int(seq), kind, path))
    return sorted(named)
