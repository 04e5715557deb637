"""`loragate audit …`: verify the trail against its anchors, write checkpoints and keys,
prove and check inclusion and consistency, query and export entries.

  loragate audit verify [--checkpoints DIR] [--hmac-key-file F] [--public-key F]
  loragate audit checkpoint [--reason R] [--out DIR]
  loragate audit keygen --dir DIR [--key-id ID]
  loragate audit prove SEQ [--checkpoint FILE]          (inclusion proof, JSON)
  loragate audit prove --from OLD.json --to NEW.json    (consistency proof, JSON)
  loragate audit check-proof PROOF --checkpoint FILE [--old-checkpoint FILE] [--public-key F]
  loragate audit query|export [filters] […]; audit verify-export FILE

Exit codes: 0 holds, 1 broken (the message names the first bad seq and why), 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit import anchors, merkle, query
from audit import log as audit_log
from audit.anchors import AnchorError, TreeHead

Database = Callable[..., Any]  # gateway.cli._database
SettingsOf = Callable[[argparse.Namespace], Any]


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _latest_checkpoint(directory: Path) -> TreeHead:
    found = anchors.read_checkpoints(directory)
    if not found:
        raise AnchorError(f"no checkpoint in {directory}; write one with "
                          "`loragate audit checkpoint`")
    return found[-1]


def cmd_verify(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    keys = anchors.load_hmac_keys(Path(args.hmac_key_file) if args.hmac_key_file else None)
    checkpoints = anchors.read_checkpoints(Path(args.checkpoints)) if args.checkpoints else []
    public = anchors.load_public_key(Path(args.public_key)) if args.public_key else None
    with database(args, read_only=True) as session:
        result = audit_log.verify(session, keys=keys, checkpoints=checkpoints,
                                  public_key=public)
    print(result.describe(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def cmd_checkpoint(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    s = settings(args)
    directory = Path(args.out) if args.out else s.checkpoint_dir
    with database(args, read_only=True) as session:
        written = audit_log.write_checkpoint(session, directory, args.reason, s.signing_key())
    if written is None:
        return _fail("the audit log is empty; nothing to checkpoint")
    print(written[1])
    return 0


def cmd_keygen(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    hmac_file = directory / "audit-hmac.keys"
    key_id = args.key_id or dt.datetime.now(dt.UTC).strftime("k%Y%m%d%H%M%S")
    existing = hmac_file.read_text() if hmac_file.exists() else ""
    if any(line.split(":", 1)[0] == key_id for line in existing.splitlines()):
        return _fail(f"key id {key_id!r} is already in {hmac_file}")
    # Appending rotates: the last key signs new entries, older ones still verify.
    with hmac_file.open("a") as f:
        f.write(anchors.new_hmac_key_line(key_id) + "\n")
    hmac_file.chmod(0o600)
    private, public = directory / "audit-signing.pem", directory / "audit-signing.pub.pem"
    if not private.exists():
        anchors.write_signing_keypair(private, public)
    print(f"HMAC keys: {hmac_file} (current key id {key_id})\n"
          f"checkpoint signing key: {private}\npublic key for auditors: {public}")
    return 0


def cmd_prove(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    if args.old and args.new:
        return _prove_consistency(args, database)
    if args.seq is None:
        return _fail("give SEQ for an inclusion proof, or --from and --to for consistency")
    ckpt = (TreeHead.from_file(Path(args.checkpoint)) if args.checkpoint
            else _latest_checkpoint(settings(args).checkpoint_dir))
    if not 1 <= args.seq <= ckpt.seq:
        return _fail(f"seq {args.seq} is not covered by the checkpoint (seq 1..{ckpt.seq})")
    with database(args, read_only=True) as session:
        leaves = audit_log.entry_hashes(session, ckpt.seq)
        [entry] = query.find(session, query.AuditFilter(after_seq=args.seq - 1), limit=1)
    proof = merkle.inclusion_proof(leaves, args.seq - 1)
    print(json.dumps({"type": "inclusion", "entry": entry, "tree_size": ckpt.seq,
                      "merkle_root": ckpt.merkle_root, "proof": [p.hex() for p in proof]},
                     indent=2))
    return 0


def _prove_consistency(args: argparse.Namespace, database: Database) -> int:
    old, new = TreeHead.from_file(Path(args.old)), TreeHead.from_file(Path(args.new))
    if old.seq > new.seq:
        return _fail("--from must be the older (smaller) checkpoint")
    with database(args, read_only=True) as session:
        leaves = audit_log.entry_hashes(session, new.seq)
    proof = merkle.consistency_proof(leaves, old.seq)
    print(json.dumps({"type": "consistency", "old_size": old.seq, "new_size": new.seq,
                      "old_root": old.merkle_root, "new_root": new.merkle_root,
                      "proof": [p.hex() for p in proof]}, indent=2))
    return 0


def check_proof(proof: dict[str, Any], ckpt: TreeHead, old: TreeHead | None = None
                ) -> str | None:
    """None when the proof holds against the checkpoint(s), else why not."""
    path = [bytes.fromhex(p) for p in proof["proof"]]
    if proof["type"] == "inclusion":
        e = proof["entry"]
        if audit_log.entry_hash_of(e) != e["entry_hash"]:
            return "the entry's content does not match its entry_hash"
        if proof["tree_size"] != ckpt.seq:
            return f"the proof is for a tree of {proof['tree_size']}, the checkpoint of {ckpt.seq}"
        ok = merkle.verify_inclusion(bytes.fromhex(e["entry_hash"]), e["seq"] - 1, ckpt.seq,
                                     path, bytes.fromhex(ckpt.merkle_root))
        return None if ok else f"seq {e['seq']} is not in the tree of the checkpoint"
    if old is None:
        return "a consistency proof needs --old-checkpoint"
    ok = merkle.verify_consistency(old.seq, ckpt.seq, bytes.fromhex(old.merkle_root),
                                   bytes.fromhex(ckpt.merkle_root), path)
    return None if ok else (f"the log at seq {ckpt.seq} does not extend the log at seq "
                            f"{old.seq}: history was rewritten")


def cmd_check_proof(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    proof = json.loads(Path(args.proof).read_text())
    ckpt = TreeHead.from_file(Path(args.checkpoint))
    old = TreeHead.from_file(Path(args.old_checkpoint)) if args.old_checkpoint else None
    if args.public_key:
        public = anchors.load_public_key(Path(args.public_key))
        for c in filter(None, (ckpt, old)):
            if not c.signature_ok(public):
                print(f"proof NOT verified: checkpoint of seq {c.seq} is not signed by "
                      "this key", file=sys.stderr)
                return 1
    why = check_proof(proof, ckpt, old)
    if why:
        print(f"proof NOT verified: {why}", file=sys.stderr)
        return 1
    print(f"proof verified against the checkpoint of seq {ckpt.seq} ({ckpt.merkle_root})")
    return 0


def _filter(args: argparse.Namespace) -> query.AuditFilter:
    try:  # a bad time is the caller's to fix: exit 2 with the reason
        since, until = (query.normalize_time(t) if t else None for t in (args.since, args.until))
    except ValueError as exc:
        raise AnchorError(f"--since/--until: {exc}") from exc
    return query.AuditFilter(actor=args.actor, api_key_id=args.key, training_run=args.run,
                             event_types=tuple(args.event or ()), decision=args.decision,
                             since=since, until=until, after_seq=args.after_seq)


def cmd_query(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    with database(args, read_only=True) as session:
        for entry in query.find(session, _filter(args), args.limit):
            print(json.dumps(entry, ensure_ascii=False))
    return 0


def cmd_export(args: argparse.Namespace, database: Database, settings: SettingsOf) -> int:
    count = 0
    with database(args, read_only=True) as session, open(args.out, "w") as out:
        for line in query.export(session, _filter(args)):
            out.write(line)
            count += 1
    print(f"{count} entries written to {args.out}")
    return 0


def cmd_verify_export(args: argparse.Namespace, database: Database,
                      settings: SettingsOf) -> int:
    with open(args.file) as lines:
        result = query.verify_export(lines)
    if not result.ok:
        print(f"export BROKEN at seq {result.bad_seq}: {result.reason}", file=sys.stderr)
        return 1
    print(f"export OK: {result.entries} entries (seq {result.first_seq}..{result.last_seq}), "
          f"{result.linked} chain links checked")
    return 0


def add_commands(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify, anchor, prove, query")
    cmds = audit.add_subparsers(dest="audit_cmd", required=True)

    def command(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text)
        data_dir(p)
        p.set_defaults(audit_func=func)
        return p

    verify = command("verify", cmd_verify, "check the chain, MACs and checkpoints; exit 1 "
                     "naming the first bad seq")
    verify.add_argument("--checkpoints", help="directory of checkpoints to hold the log to")
    verify.add_argument("--hmac-key-file", help="HMAC keys (key_id:hexsecret per line)")
    verify.add_argument("--public-key", help="Ed25519 public key the checkpoints must be "
                        "signed with")
    checkpoint = command("checkpoint", cmd_checkpoint, "write a checkpoint of the head now")
    checkpoint.add_argument("--reason", default="manual")
    checkpoint.add_argument("--out", help="directory (default: the configured one)")
    keygen = command("keygen", cmd_keygen, "create (or rotate) the HMAC key and the "
                     "checkpoint signing key pair")
    keygen.add_argument("--dir", required=True)
    keygen.add_argument("--key-id")
    prove = command("prove", cmd_prove, "print an inclusion or consistency proof (JSON)")
    prove.add_argument("seq", nargs="?", type=int)
    prove.add_argument("--checkpoint", help="checkpoint file (default: the latest)")
    prove.add_argument("--from", dest="old", help="older checkpoint (consistency proof)")
    prove.add_argument("--to", dest="new", help="newer checkpoint (consistency proof)")
    check = command("check-proof", cmd_check_proof, "verify a proof against checkpoints")
    check.add_argument("proof")
    check.add_argument("--checkpoint", required=True)
    check.add_argument("--old-checkpoint")
    check.add_argument("--public-key")
    for name, func in (("query", cmd_query), ("export", cmd_export)):
        p = command(name, func, f"{name} entries by actor, key, run, event, decision, time")
        p.add_argument("--actor")
        p.add_argument("--key", help="API key id")
        p.add_argument("--run", help="training run id")
        p.add_argument("--event", action="append", help="event type (repeatable)")
        p.add_argument("--decision")
        p.add_argument("--since", help="RFC 3339 UTC, e.g. 2026-11-21T00:00:00.000000Z")
        p.add_argument("--until")
        p.add_argument("--after-seq", type=int, default=0)
        if name == "query":
            p.add_argument("--limit", type=int, default=100)
        else:
            p.add_argument("--out", required=True)
    verify_export = command("verify-export", cmd_verify_export, "verify an export offline")
    verify_export.add_argument("file")
