"""The `loragate` command line. Other tools drive these commands; keep them stable:

  loragate serve [--host H] [--port P] [--data-dir D] [--base-model NAME] [--no-worker]
                 [--metrics-bind HOST:PORT]
  loragate worker [--data-dir D] [--base-model NAME] [--metrics-bind HOST:PORT]
                  [--worker-id ID] [--lease-seconds S]
  loragate keys create --role researcher|auditor|admin --owner NAME [--expires-in-days N]
                       [--scopes JSON]
  loragate keys add NAME --reason R [--expires-in-days N] [--scopes JSON]
                    (another key for an existing principal: explicit and audited)
  loragate keys list | keys revoke KEY_ID [--reason R]
  loragate keys request|claim|requests|approve|reject … (the access-request lifecycle)
  loragate audit verify|checkpoint|keygen|prove|check-proof|query|export|verify-export …
                 (see gateway/cli_audit.py)
  loragate usage [--owner NAME] [--data-dir D]   (JSON: per key and per training run)
  loragate screen FILE.jsonl [--base-model M]; loragate screening show|set-threshold …
  loragate release request TINKER_PATH [--wait] | release show RELEASE_ID [--report]
                   | release calibrate [--data DIR] [--out FILE] [--runs N]
  loragate policy list|add SUBJECT RESOURCE ACTION allow|deny|remove ID [--data-dir D]
  loragate models prepare [--data-dir D] [--base-model NAME]
  loragate checkpoints sweep [--data-dir D]     (delete expired checkpoints, audited)
  loragate futures purge [--retention-days N] [--data-dir D]
                   (purge unretrieved request/result payloads past the retention, audited)

`LORAGATE_DATABASE_URL` overrides the SQLite default for all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import cli_audit, cli_release, cli_screening, logs
from gateway.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from policy.scopes import Scopes


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    models = tuple(args.base_model) if getattr(args, "base_model", None) else None
    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else None
    return Settings.from_env(data_dir=data_dir, base_models=models, **extra)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings(args, run_worker=not args.no_worker, host=args.host, port=args.port,
                         metrics_bind=args.metrics_bind)
    # log_config=None keeps our JSON logging; requests are logged by the app (with the
    # request id its audit row carries), so uvicorn's access log is off.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", log_config=None, access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from gateway import composition
    from gateway.metrics import serve_metrics

    settings = _settings(args, metrics_bind=args.metrics_bind)
    if settings.metrics_bind:  # this process's own metrics (gateway.metrics)
        serve_metrics(settings.metrics_bind)
    worker = composition.worker(settings, composition.session_factory(settings),
                                worker_id=args.worker_id, idle_poll_seconds=0.05,
                                lease_seconds=args.lease_seconds)
    for name in settings.base_models:
        worker.backend(name)
    # What this worker id was running when its last process died runs again.
    worker.requeue_interrupted()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run_forever(stop)
    # Everything the worker did is committed and on disk. Leave without the interpreter's
    # teardown, where torch's native thread pools can abort the process (SIGABRT,
    # "terminate called without an active exception") and turn a clean stop into a crash
    # that a service manager reports and restarts.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def _database(args: argparse.Namespace, read_only: bool = False) -> Iterator[Session]:
    """One transaction on the (migrated) database the arguments point at."""
    from audit.db import transaction
    from gateway import composition

    with composition.database(_settings(args), read_only=read_only) as factory, \
            transaction(factory) as session:
        yield session


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from audit.models import utcnow
    from policy.keys import create_key

    expires = None
    if args.expires_in_days is not None:
        if args.expires_in_days < 1:
            print("error: --expires-in-days must be at least 1", file=sys.stderr)
            return 2
        expires = utcnow() + dt.timedelta(days=args.expires_in_days)
    scopes = _json_object(args.scopes) if args.scopes else {}
    with _database(args) as session:
        key = create_key(session, owner=args.owner, role=args.role, actor="cli",
                         defaults=_scope_defaults(args), expires_at=expires, scopes=scopes)
    print(key)  # only after the commit: a printed key always exists
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    """Another key for an existing principal (audited as `keys.add` by 'cli')."""
    from audit.models import utcnow
    from policy.keys import add_key

    if args.expires_in_days is not None and args.expires_in_days < 1:
        print("error: --expires-in-days must be at least 1", file=sys.stderr)
        return 2
    expires = (utcnow() + dt.timedelta(days=args.expires_in_days)
               if args.expires_in_days else None)
    scopes = _json_object(args.scopes) if args.scopes else {}
    with _database(args) as session:
        key, _ = add_key(session, principal_name=args.name, actor="cli", reason=args.reason,
                         defaults=_scope_defaults(args), expires_at=expires, scopes=scopes)
    print(key)  # only after the commit: a printed key always exists
    return 0


def _cmd_keys_admin(args: argparse.Namespace) -> int:
    """`keys list` and `keys revoke`, directly in the database (audited as 'cli')."""
    from policy import keys

    with _database(args) as session:
        if args.keys_cmd == "revoke":
            keys.revoke_key(session, key_id=args.key_id, actor="cli", reason=args.reason)
            return 0
        for key, principal in keys.list_keys(session):
            expires = key.expires_at.isoformat() if key.expires_at else "-"
            print(f"{key.id}\t{key.prefix}…\t{principal.name}\t{principal.role}\t"
                  f"{key.status}\texpires {expires}")
    return 0


def _scope_defaults(args: argparse.Namespace) -> Scopes:
    from policy.scopes import load_defaults

    return load_defaults(_settings(args).scopes_file)


def _json_object(text: str) -> dict[str, object]:
    from policy.errors import LimitExceeded

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LimitExceeded(f"--scopes is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise LimitExceeded("--scopes must be a JSON object")
    return value


def _cmd_access(args: argparse.Namespace) -> int:
    """The access-request lifecycle from the command line (admin steps audited as 'cli')."""
    from policy import access

    with _database(args) as session:
        if args.keys_cmd == "request":
            _, output = access.request_access(session, name=args.name, contact=args.contact,
                                              purpose=args.purpose,
                                              base_models=args.base_model or [])
        elif args.keys_cmd == "claim":
            output = access.claim(session, args.claim_token, _scope_defaults(args))
        elif args.keys_cmd == "approve":
            scopes = _json_object(args.scopes) if args.scopes else {}
            access.approve(session, request_id=args.request_id, actor="cli", role=args.role,
                           scopes=scopes, expires_in_days=args.expires_in_days,
                           defaults=_scope_defaults(args))
            output = ""
        elif args.keys_cmd == "reject":
            access.reject(session, request_id=args.request_id, actor="cli", reason=args.reason)
            output = ""
        else:
            output = "\n".join(f"{r.id}\t{r.status}\t{r.name}\t{r.contact}\t{r.purpose[:60]}"
                               for r in access.list_requests(session, args.status))
    if output:
        print(output)  # a token or key is printed only after it was committed
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    return int(args.audit_func(args, _database, _settings))


def _cmd_usage(args: argparse.Namespace) -> int:
    """Usage per key and per run, for everyone or one principal (read-only)."""
    from sqlalchemy import select

    from audit.models import Principal
    from policy.quotas import usage_report

    defaults = _scope_defaults(args)
    with _database(args, read_only=True) as session:
        principals = None
        if args.owner:
            found = session.scalars(select(Principal.id).where(
                Principal.name == args.owner)).first()
            if found is None:
                print(f"error: principal {args.owner!r} not found", file=sys.stderr)
                return 2
            principals = [found]
        report = usage_report(session, principals, defaults)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    """List, add or remove policy rules directly in the database (audited as 'cli')."""
    from policy import authz

    with _database(args) as session:
        authz.seed_default_policy(session, actor="cli")
        if args.policy_cmd == "add":
            rules = [authz.add_rule(session, actor="cli", subject=args.subject,
                                    resource=args.resource, action=args.action,
                                    effect=args.effect)]
        elif args.policy_cmd == "remove":
            authz.remove_rule(session, actor="cli", rule_id=args.rule_id)
            rules = []
        else:
            rules = authz.list_rules(session)
        lines = [f"{rule.id}\t{', '.join([rule.ptype, *rule.values()])}" for rule in rules]
    if lines:
        print("\n".join(lines))
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from gateway import composition

    settings = _settings(args)
    registry = composition.model_registry(settings)
    for name in settings.base_models:
        print(f"{name}: {registry.materialize(name)}")
    return 0


def _cmd_checkpoints_sweep(args: argparse.Namespace) -> int:
    """Delete every checkpoint past its TTL now (the worker also does this periodically);
    prints the tinker paths deleted, one a line."""
    from engine.sweeper import sweep_expired_checkpoints
    from gateway import composition

    settings = _settings(args)
    with composition.database(settings) as factory:
        while swept := sweep_expired_checkpoints(
                factory, settings.checkpoint_root, actor="cli",
                before_delete=composition.cancel_overrides_of_expired):
            print("\n".join(swept))
    return 0


def _cmd_futures_purge(args: argparse.Namespace) -> int:
    """Purge now the payloads of futures never retrieved within the retention (the API
    server also does this periodically); prints the request ids purged, one a line."""
    from audit.retention import purge_all_expired
    from gateway import composition

    settings = _settings(args)
    days = settings.payload_retention_days if args.retention_days is None \
        else args.retention_days
    if days < 0:
        print("error: --retention-days must be >= 0", file=sys.stderr)
        return 2
    with composition.database(settings) as factory:
        purged = purge_all_expired(factory, retention_days=days, actor="cli")
    if purged:
        print("\n".join(purged))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loragate",
                                     description="Safety-gated LoRA fine-tuning gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory (default ./data or LORAGATE_DATA_DIR)")

    def base_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-model", action="append",
                       help="base model to serve (repeatable; default SmolLM2-135M-Instruct)")

    def metrics_bind(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--metrics-bind", metavar="HOST:PORT",
                       help=f"also serve {what} in Prometheus text, without a key, on "
                            "HOST:PORT (a private network only; default LORAGATE_METRICS_BIND)")

    serve = sub.add_parser("serve", help="run the API (and, by default, an embedded worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true",
                       help="API only; run `loragate worker` processes separately")
    data_dir(serve)
    base_model(serve)
    metrics_bind(serve, "this process's metrics and the deployment's (as GET /metrics)")
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser("worker", help="run a worker process against the database")
    worker.add_argument("--worker-id", default="worker-0",
                        help="unique among live workers; restart a dead worker under its id")
    worker.add_argument("--lease-seconds", type=float, default=30.0,
                        help="how long this worker's runs stay its own after its last "
                             "heartbeat; a worker silent that long is taken for dead")
    data_dir(worker)
    base_model(worker)
    metrics_bind(worker, "this worker process's own metrics (audit appends, withheld "
                 "outputs, the Python process)")
    worker.set_defaults(func=_cmd_worker)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd",
                                                                        required=True)
    create = keys.add_parser("create", help="enroll a new principal with a key; prints the "
                             "key alone on stdout")
    create.add_argument("--role", required=True, choices=["researcher", "auditor", "admin"])
    create.add_argument("--owner", required=True,
                        help="the new principal's name (an existing name is refused: see "
                        "`keys add`)")
    create.add_argument("--expires-in-days", type=int, help="the key stops working after this")
    create.add_argument("--scopes", help="JSON object overriding default scopes, e.g. "
                        '\'{"max_lora_rank": 8, "training_tokens_per_day": 100000}\'')
    data_dir(create)
    create.set_defaults(func=_cmd_keys_create)
    key_add = keys.add_parser("add", help="add a key to an existing principal (audited); "
                              "prints the key alone")
    key_add.add_argument("name", help="the existing principal's name")
    key_add.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    key_add.add_argument("--expires-in-days", type=int, help="the key stops working after this")
    key_add.add_argument("--scopes", help="JSON object overriding default scopes")
    data_dir(key_add)
    key_add.set_defaults(func=_cmd_keys_add)
    key_list = keys.add_parser("list", help="id, prefix, owner, role, status, expiry")
    data_dir(key_list)
    key_list.set_defaults(func=_cmd_keys_admin)
    request = keys.add_parser("request", help="request access; prints the claim token alone")
    request.add_argument("--name", required=True, help="the principal name you want")
    request.add_argument("--contact", required=True)
    request.add_argument("--purpose", required=True)
    request.add_argument("--base-model", action="append", help="wanted base model (repeatable)")
    claim = keys.add_parser("claim", help="exchange an approved claim token for the key")
    claim.add_argument("claim_token")
    requests = keys.add_parser("requests", help="list access requests")
    requests.add_argument("--status", choices=["pending", "approved", "rejected", "claimed"])
    approve = keys.add_parser("approve", help="approve an access request")
    approve.add_argument("request_id")
    approve.add_argument("--role", default="researcher",
                         choices=["researcher", "auditor", "admin"])
    approve.add_argument("--expires-in-days", type=int)
    approve.add_argument("--scopes", help="JSON object of scopes for the key")
    reject = keys.add_parser("reject", help="reject an access request (the reason is shown)")
    reject.add_argument("request_id")
    reject.add_argument("--reason", required=True)
    for cmd in (request, claim, requests, approve, reject):
        data_dir(cmd)
        cmd.set_defaults(func=_cmd_access)
    revoke = keys.add_parser("revoke", help="revoke a key by id (see `keys list`)")
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", default="revoked by an operator")
    data_dir(revoke)
    revoke.set_defaults(func=_cmd_keys_admin)

    cli_audit.add_commands(sub, data_dir)
    cli_screening.add_commands(sub, data_dir, lambda func, a: func(a, _database, _settings))
    cli_release.add_commands(sub, data_dir, _database, _settings)
    sub.choices["audit"].set_defaults(func=_cmd_audit)

    usage = sub.add_parser("usage", help="tokens and checkpoints per key and per training run")
    usage.add_argument("--owner", help="one principal's usage (default: everyone's)")
    data_dir(usage)
    usage.set_defaults(func=_cmd_usage)

    policy = sub.add_parser("policy", help="authorization rules (casbin)").add_subparsers(
        dest="policy_cmd", required=True)
    listing = policy.add_parser("list", help="print the rules in force: id, rule")
    data_dir(listing)
    listing.set_defaults(func=_cmd_policy)
    add = policy.add_parser("add", help="add a rule; takes effect on the next request")
    add.add_argument("subject", help="'*', 'role:<name>' or 'principal:<id>'")
    add.add_argument("resource")
    add.add_argument("action")
    add.add_argument("effect", choices=["allow", "deny"])
    data_dir(add)
    add.set_defaults(func=_cmd_policy)
    remove = policy.add_parser("remove", help="remove a rule by id")
    remove.add_argument("rule_id", type=int)
    data_dir(remove)
    remove.set_defaults(func=_cmd_policy)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_cmd",
                                                                         required=True)
    prepare = models.add_parser("prepare", help="materialize base models into the data dir")
    data_dir(prepare)
    base_model(prepare)
    prepare.set_defaults(func=_cmd_models_prepare)

    checkpoints = sub.add_parser("checkpoints", help="stored adapter checkpoints").add_subparsers(
        dest="checkpoints_cmd", required=True)
    sweep = checkpoints.add_parser("sweep", help="delete checkpoints past their TTL (audited)")
    data_dir(sweep)
    sweep.set_defaults(func=_cmd_checkpoints_sweep)

    futures = sub.add_parser("futures", help="queued requests and their results").add_subparsers(
        dest="futures_cmd", required=True)
    purge = futures.add_parser("purge", help="purge unretrieved payloads past the retention "
                                             "(audited with their SHA-256)")
    purge.add_argument("--retention-days", type=float, default=None,
                       help="days after a future finished (default: payload_retention_days, "
                            "7, or LORAGATE_PAYLOAD_RETENTION_DAYS)")
    data_dir(purge)
    purge.set_defaults(func=_cmd_futures_purge)
    return parser


def main(argv: list[str] | None = None) -> int:
    logs.configure(logging.INFO)
    args = build_parser().parse_args(argv)
    from audit.anchors import AnchorError
    from policy.errors import PolicyError

    try:
        return int(args.func(args))
    except (PolicyError, AnchorError) as exc:  # a refusal or unusable input: say why, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
