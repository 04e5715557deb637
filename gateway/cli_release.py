"""`loragate release …`: ask for a checkpoint's release evaluation as the operator
(audited as 'cli') and follow it, or read a decision and its report.

  loragate release request TINKER_PATH [--wait]   queue the evaluation; with --wait show
                                                  progress and exit 0 released, 1 quarantined
  loragate release show RELEASE_ID [--report]     status and progress (JSON); --report: the
                                                  stored report, exactly as its digest was made
  loragate release calibrate [--data DIR] [--out FILE] [--runs N] [--base-model M]
                                                  train N benign adapters (default 8) on the
                                                  everyday sets in DIR, run the release
                                                  policy's suites on each and write the
                                                  tolerances (see evals/calibration.py)

The evaluation itself runs in a worker (`loragate serve` or `loragate worker`). Overrides of
a quarantine are API-only: they need two authenticated people (see README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

Database = Callable[..., Any]
POLL_SECONDS = 1.0


def cmd_request(args: argparse.Namespace, database: Database) -> int:
    from sqlalchemy import select

    from audit.models import Checkpoint, TrainingRun
    from evals.release import queue_release

    with database(args) as session:
        ckpt = session.scalars(select(Checkpoint).where(
            Checkpoint.tinker_path == args.tinker_path)).first()
        if ckpt is None:
            print(f"error: checkpoint {args.tinker_path} not found", file=sys.stderr)
            return 2
        run = session.get(TrainingRun, ckpt.training_run_id)
        release = queue_release(session, ckpt, run, trigger="request", actor="cli")
        release_id = release.id
    print(release_id)
    return _wait(args, database, release_id) if args.wait else 0


def _wait(args: argparse.Namespace, database: Database, release_id: str) -> int:
    from tqdm import tqdm

    from audit.models import ReleaseRequest

    with tqdm(desc=release_id, unit="step", file=sys.stderr) as bar:
        while True:
            with database(args, read_only=True) as session:
                row = session.get(ReleaseRequest, release_id)
                status, done, total, note = (row.status, row.progress_done, row.progress_total,
                                             row.progress_note)
            bar.total = total or None
            bar.n = done
            bar.set_postfix_str(note or status)
            if status not in ("queued", "evaluating"):
                break
            time.sleep(POLL_SECONDS)
    print(status)
    return 0 if status == "released" else 1


def cmd_show(args: argparse.Namespace, database: Database) -> int:
    from audit.models import Checkpoint, ReleaseReport, ReleaseRequest
    from gateway.routes.release import release_view

    with database(args, read_only=True) as session:
        row = session.get(ReleaseRequest, args.release_id)
        if row is None:
            print(f"error: release {args.release_id} not found", file=sys.stderr)
            return 2
        if args.report:
            report = session.get(ReleaseReport, row.report_id) if row.report_id else None
            if report is None:
                print(f"error: release {args.release_id} has no report yet ({row.status})",
                      file=sys.stderr)
                return 2
            print(report.report)
            return 0
        print(json.dumps(release_view(row, session.get(Checkpoint, row.checkpoint_id)),
                         indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace, settings_for: Callable[..., Any]) -> int:
    """Train the benign runs in this process on a scratch database (the evaluation cache)
    and write the calibration file; the release policy names it to use it."""
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from engine.torch_backend import load_backend
    from evals.calibration import DEFAULT_RUNS, calibrate
    from gateway import composition

    settings = settings_for(args)
    runs = DEFAULT_RUNS[:args.runs] if args.runs else DEFAULT_RUNS
    missing = [run.data for run in runs if not (args.data / f"{run.data}.jsonl.gz").is_file()]
    if missing:
        print(f"error: {args.data} lacks {sorted(set(missing))} (.jsonl.gz); build them with "
              "training/release_data/build.py", file=sys.stderr)
        return 2
    registry = composition.model_registry(settings)
    name = settings.base_models[0]
    backend = load_backend(registry, name, settings.device)
    with tempfile.TemporaryDirectory() as scratch:
        factory = composition.session_factory(
            settings, url=f"sqlite:///{Path(scratch) / 'calibration.db'}")
        evaluator = composition.release_evaluator(
            factory, composition.release_policy(settings, calibrated=False),
            composition.screener(settings, factory))
        base_sha = evaluator.base_sha256(backend, registry.materialize(name))
        with tqdm(total=len(runs), desc="calibration", unit="run", file=sys.stderr) as bar:
            def evaluate(adapter_id: str) -> dict[str, Any]:
                report = evaluator.evaluate(backend, adapter_id, base_sha, adapter_id,
                                            lambda done, total, note: bar.set_postfix_str(note))
                bar.update(1)
                return dict(report)

            result = calibrate(backend, evaluate, base_sha, args.data, runs,
                               lambda note: bar.set_postfix_str(note))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(args.out)
    return 0


def add_commands(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None],
                 database: Database, settings_for: Callable[..., Any]) -> None:
    cmds = sub.add_parser("release", help="release evaluations of checkpoints").add_subparsers(
        dest="release_cmd", required=True)
    request = cmds.add_parser("request", help="queue a checkpoint's release evaluation")
    request.add_argument("tinker_path")
    request.add_argument("--wait", action="store_true",
                         help="follow it; exit 0 when released, 1 when quarantined")
    show = cmds.add_parser("show", help="a release's status, or its report (--report)")
    show.add_argument("release_id")
    show.add_argument("--report", action="store_true")
    data_dir(request)
    data_dir(show)
    request.set_defaults(func=lambda a: cmd_request(a, database))
    show.set_defaults(func=lambda a: cmd_show(a, database))
    _calibrate_parser(cmds, data_dir, settings_for)


def _calibrate_parser(cmds: Any, data_dir: Callable[[argparse.ArgumentParser], None],
                      settings_for: Callable[..., Any]) -> None:
    from pathlib import Path

    calib = cmds.add_parser("calibrate", help="measure the suites' shifts on benign "
                                              "fine-tunes and write the tolerances")
    calib.add_argument("--data", type=Path, default=Path("training/release_data"),
                       help="directory of the everyday calib_*.jsonl.gz sets")
    calib.add_argument("--out", type=Path, default=Path("release_calibration.json"))
    calib.add_argument("--runs", type=int, default=0,
                       help="the first N of the default runs (default: all)")
    calib.add_argument("--base-model", action="append",
                       help="the base model to calibrate (default: the gateway's first)")
    data_dir(calib)
    calib.set_defaults(func=lambda a: cmd_calibrate(a, settings_for))
