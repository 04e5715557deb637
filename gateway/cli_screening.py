"""`loragate screen` and `loragate screening …`: screen a dataset before training, and
read or set the screening thresholds (audited as 'cli').

  loragate screen FILE.jsonl [--base-model M]      report: indices and categories (JSON),
                                                   screened as training would (chat examples
                                                   through M's chat template; default: the
                                                   first served base model); exit 1 when
                                                   anything is flagged
  loragate screening show                          classifiers and thresholds in force
  loragate screening set-threshold CATEGORY VALUE|--reset
  loragate screening reinstate PRINCIPAL --reason TEXT
                                                   lift a person's screening block (name or
                                                   id) after reviewing their flagged data;
                                                   their tally starts afresh
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Database = Callable[..., Any]
SettingsOf = Callable[[argparse.Namespace], Any]


def cmd_screen(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    from engine.errors import UserInputError
    from gateway import composition
    from gateway.screening import dry_run_datums, dry_run_texts
    from policy.screening.batch import screen_batch

    s = settings(args)
    lines = Path(args.file).read_text().splitlines()
    try:
        examples = [json.loads(line) for line in lines if line.strip()]
    except ValueError as exc:
        print(f"error: {args.file} is not JSONL: {exc}", file=sys.stderr)
        return 2
    info = composition.model_registry(s).info(args.base_model or s.base_models[0])
    try:
        texts = dry_run_texts(dry_run_datums(examples, info), info)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    factory = composition.session_factory(s)
    batch = screen_batch(composition.screener(s, factory), texts)
    report = {"examples": len(texts), "affirmative_openers": batch.affirmative,
              "flagged": [{"index": i, "categories": sorted(set(c))}
                          for i, c in sorted(batch.flagged.items())]}
    print(json.dumps(report, indent=2))
    return 1 if batch.flagged else 0


def cmd_screening(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    from audit.db import transaction
    from gateway import composition
    from policy.screening.screener import set_threshold

    s = settings(args)
    factory = composition.session_factory(s)
    screener = composition.screener(s, factory)
    if args.screening_cmd == "set-threshold":
        value = None if args.reset else args.value
        if value is None and not args.reset:
            print("error: give VALUE or --reset", file=sys.stderr)
            return 2
        with transaction(factory) as session:
            set_threshold(session, actor="cli", category=args.category, value=value,
                          config=screener.config, known=screener.categories())
    overrides = screener.thresholds()
    print(json.dumps({**screener.describe(), "thresholds": {
        k: screener.config.threshold(k, overrides) for k in screener.categories()}}, indent=2))
    return 0


def cmd_reinstate(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    from sqlalchemy import or_, select

    from audit.db import transaction
    from audit.models import Principal
    from gateway import composition
    from policy.screening.tally import reinstate_principal

    factory = composition.session_factory(settings(args))
    with transaction(factory) as session:
        found = session.scalars(select(Principal).where(or_(
            Principal.id == args.principal, Principal.name == args.principal))).first()
        if found is None:
            print(f"error: no principal named or with id {args.principal!r}", file=sys.stderr)
            return 2
        person = reinstate_principal(session, found.id, actor="cli", reason=args.reason)
        print(json.dumps({"id": person.id, "name": person.name, "blocked": None}))
    return 0


def add_commands(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None],
                 run: Callable[..., int]) -> None:
    screen = sub.add_parser("screen", help="screen a JSONL dataset (chat messages or token "
                            "datums) before training; exit 1 when anything is flagged")
    screen.add_argument("file")
    screen.add_argument("--base-model", help="the model whose tokenizer and chat template "
                        "training would use (default: the first served base model)")
    data_dir(screen)
    screen.set_defaults(func=lambda a: run(cmd_screen, a))
    cmds = sub.add_parser("screening", help="the screening thresholds in force").add_subparsers(
        dest="screening_cmd", required=True)
    show = cmds.add_parser("show")
    setter = cmds.add_parser("set-threshold", help="override a category's threshold (audited)")
    setter.add_argument("category", help='"classifier.category", e.g. harmful_request.drugs')
    setter.add_argument("value", nargs="?", type=float)
    setter.add_argument("--reset", action="store_true", help="back to the policy file's value")
    for p in (show, setter):
        data_dir(p)
        p.set_defaults(func=lambda a: run(cmd_screening, a))
    reinstate = cmds.add_parser("reinstate", help="lift a person's screening block after "
                                "review (audited); their tally starts afresh")
    reinstate.add_argument("principal", help="the person's name or principal id")
    reinstate.add_argument("--reason", required=True, help="what the review found")
    data_dir(reinstate)
    reinstate.set_defaults(func=lambda a: run(cmd_reinstate, a))
