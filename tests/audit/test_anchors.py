"""What a chain alone cannot catch, caught by anchors outside the database — on SQLite
and PostgreSQL: rows swapped, a truncated tail (against a checkpoint), a chain
recomputed by someone with write access (against the HMAC key or a checkpoint), forged
checkpoints, and proofs of inclusion and consistency through the CLI."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import select

from audit import anchors
from audit import log as audit_log
from audit.anchors import HmacKeys
from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import AuditEntry
from migrations import upgrade_to_head
from tests.api.helpers import run_cli
from tests.audit.test_audit_chain import _append, _without_triggers

KEYS = HmacKeys(secrets={"k1": b"\x01" * 32}, current="k1")


@pytest.fixture
def signed(tmp_path):
    """A signing key pair on disk."""
    private, public = tmp_path / "sign.pem", tmp_path / "sign.pub.pem"
    anchors.write_signing_keypair(private, public)
    return anchors.load_signing_key(private), anchors.load_public_key(public)


@pytest.fixture
def log(database_url):
    """A migrated database whose appends carry MACs; yields (factory, url)."""
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine, KEYS)
    engine.dispose()


def verify(factory, **kwargs) -> audit_log.VerifyResult:
    with transaction(factory) as session:
        return audit_log.verify(session, **kwargs)


def checkpoint(factory, tmp_path: Path, key=None) -> anchors.TreeHead:
    with transaction(factory) as session:
        ckpt, _ = audit_log.write_checkpoint(session, tmp_path / "ckpts", "test", key)
    return ckpt


def recompute_from(factory, seq: int, payload: str) -> None:
    """Rewrite entry `seq` and re-hash the chain after it, as a database administrator
    without the HMAC key would: every link and content hash is valid again."""
    with transaction(factory) as session:
        rows = session.execute(select(*audit_log.COLUMNS).where(AuditEntry.seq >= seq)
                               .order_by(AuditEntry.seq)).all()
        prev = session.scalar(select(AuditEntry.entry_hash).where(
            AuditEntry.seq == seq - 1)) or audit_log.GENESIS_HASH
    statements = []
    for row in rows:
        fields = dict(zip(audit_log.HASHED_FIELDS, row[:9], strict=True))
        fields["prev_hash"] = prev
        if row[0] == seq:
            fields["payload"] = payload
        new_hash = audit_log.compute_entry_hash(**fields)
        statements.append({"s": row[0], "p": fields["payload"], "ph": prev, "h": new_hash})
        prev = new_hash
    for params in statements:
        _without_triggers(factory, "UPDATE audit_log SET payload = :p, prev_hash = :ph, "
                          "entry_hash = :h, mac = NULL WHERE seq = :s", params)


def test_a_clean_log_verifies_against_its_mac_key_and_signed_checkpoints(log, tmp_path, signed):
    private, public = signed
    _append(log, 6)
    first = checkpoint(log, tmp_path, private)
    _append(log, 4)
    second = checkpoint(log, tmp_path, private)
    result = verify(log, keys=KEYS, checkpoints=[first, second], public_key=public)
    assert result.ok and result.rows == 10 and result.macs == 10 and result.checkpoints == 2
    assert result.merkle_root == second.merkle_root


def test_swapped_rows_are_reported_as_reordered(log):
    _append(log, 6)
    _without_triggers(log, "UPDATE audit_log SET seq = -3 WHERE seq = 3")
    _without_triggers(log, "UPDATE audit_log SET seq = 3 WHERE seq = 4")
    _without_triggers(log, "UPDATE audit_log SET seq = 4 WHERE seq = -3")
    result = verify(log)
    assert not result.ok and result.bad_seq == 3 and "reordered" in result.reason


def test_a_truncated_tail_verifies_alone_but_not_against_a_checkpoint(log, tmp_path):
    _append(log, 10)
    ckpt = checkpoint(log, tmp_path)
    _without_triggers(log, "DELETE FROM audit_log WHERE seq >= 8")
    assert verify(log).ok  # the shortened chain is still a valid chain
    result = verify(log, checkpoints=[ckpt])
    assert not result.ok and result.bad_seq == 8 and "truncated tail" in result.reason


def test_a_recomputed_chain_is_caught_by_the_hmac_key_and_by_a_checkpoint(log, tmp_path):
    _append(log, 10)
    ckpt = checkpoint(log, tmp_path)
    recompute_from(log, 6, '{"i":99}')
    assert verify(log).ok  # a chain alone cannot tell
    by_mac = verify(log, keys=KEYS)
    assert not by_mac.ok and by_mac.bad_seq == 6 and "without the HMAC key" in by_mac.reason
    by_checkpoint = verify(log, checkpoints=[ckpt])
    assert not by_checkpoint.ok and by_checkpoint.bad_seq == 10
    assert "rewritten" in by_checkpoint.reason


def test_stripping_every_mac_is_caught_too(log):
    _append(log, 4)
    recompute_from(log, 1, '{"i":-1}')
    result = verify(log, keys=KEYS)
    assert not result.ok and result.bad_seq == 1 and "no entry carries a valid MAC" in \
        result.reason


def test_macs_verify_across_a_key_rotation_and_need_every_key(database_url, tmp_path):
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    key_file = tmp_path / "keys"
    key_file.write_text(anchors.new_hmac_key_line("old") + "\n")
    _append(make_sessionmaker(engine, anchors.load_hmac_keys(key_file)), 3)
    key_file.write_text(key_file.read_text() + anchors.new_hmac_key_line("new") + "\n")
    rotated = anchors.load_hmac_keys(key_file)
    assert rotated.current == "new"
    _append(make_sessionmaker(engine, rotated), 3)
    factory = make_sessionmaker(engine)
    assert verify(factory, keys=rotated).macs == 6
    only_new = HmacKeys(secrets={"new": rotated.secrets["new"]}, current="new")
    result = verify(factory, keys=only_new)
    assert not result.ok and result.bad_seq == 1 and "unknown key id 'old'" in result.reason
    engine.dispose()


def test_a_forged_checkpoint_fails_its_signature(log, tmp_path, signed):
    private, public = signed
    _append(log, 3)
    ckpt = checkpoint(log, tmp_path, private)
    forged = anchors.TreeHead(**{**ckpt.__dict__, "seq": 2})
    result = verify(log, checkpoints=[forged], public_key=public)
    assert not result.ok and "no valid signature" in result.reason


def test_unusable_key_files_say_what_to_fix(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text("k1:abcd\n")
    with pytest.raises(anchors.AnchorError, match="shorter than 32 bytes"):
        anchors.load_hmac_keys(bad)
    with pytest.raises(anchors.AnchorError, match="does not exist"):
        anchors.load_hmac_keys(tmp_path / "missing")
    bad.write_text("no separator here\n")
    with pytest.raises(anchors.AnchorError, match="key_id:hexsecret"):
        anchors.load_hmac_keys(bad)


def _append_in_process(url: str, n: int) -> None:
    engine = make_engine(url)
    _append(make_sessionmaker(engine, KEYS), n)
    engine.dispose()


def test_processes_appending_at_once_leave_one_chain_without_forks(log, database_url):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_in_process, args=(database_url, 20))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    result = verify(log, keys=KEYS)
    assert result.ok and result.rows == 80 and result.macs == 80


def test_inclusion_and_consistency_proofs_through_the_cli(log, database_url, tmp_path):
    def cli(*args: str):
        return run_cli(database_url, tmp_path, "audit", *args)

    _append(log, 5)
    old_path = cli("checkpoint", "--out", str(tmp_path / "c")).stdout.strip()
    _append(log, 6)
    new_path = cli("checkpoint", "--out", str(tmp_path / "c")).stdout.strip()
    proof = cli("prove", "7", "--checkpoint", new_path)
    assert proof.returncode == 0, proof.stderr
    (tmp_path / "p.json").write_text(proof.stdout)
    ok = cli("check-proof", str(tmp_path / "p.json"), "--checkpoint", new_path)
    assert ok.returncode == 0 and "proof verified" in ok.stdout
    wrong = cli("check-proof", str(tmp_path / "p.json"), "--checkpoint", old_path)
    assert wrong.returncode == 1
    tampered = json.loads(proof.stdout)
    tampered["entry"]["payload"] = '{"i":1000}'
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    bad = cli("check-proof", str(tmp_path / "t.json"), "--checkpoint", new_path)
    assert bad.returncode == 1 and "does not match its entry_hash" in bad.stderr

    consistency = cli("prove", "--from", old_path, "--to", new_path)
    (tmp_path / "k.json").write_text(consistency.stdout)
    assert cli("check-proof", str(tmp_path / "k.json"), "--checkpoint", new_path,
               "--old-checkpoint", old_path).returncode == 0
    # History rewritten before the old checkpoint: the new head no longer extends it.
    recompute_from(log, 2, '{"i":-2}')
    rewritten = cli("checkpoint", "--out", str(tmp_path / "d")).stdout.strip()
    forged = cli("prove", "--from", old_path, "--to", rewritten)
    (tmp_path / "f.json").write_text(forged.stdout)
    refused = cli("check-proof", str(tmp_path / "f.json"), "--checkpoint", rewritten,
                  "--old-checkpoint", old_path)
    assert refused.returncode == 1 and "history was rewritten" in refused.stderr
    verified = cli("verify", "--checkpoints", str(tmp_path / "c"))
    assert verified.returncode == 1 and "seq 5" in verified.stderr


def test_an_export_verifies_offline_and_a_modified_line_does_not(log, database_url, tmp_path):
    _append(log, 8)
    out = tmp_path / "audit.jsonl"
    assert run_cli(database_url, tmp_path, "audit", "export", "--out", str(out)).returncode == 0
    ok = run_cli(database_url, tmp_path, "audit", "verify-export", str(out))
    assert ok.returncode == 0 and "8 entries" in ok.stdout and "7 chain links" in ok.stdout
    lines = out.read_text().splitlines()
    entry = json.loads(lines[3])
    entry["subject"] = "something else"
    lines[3] = json.dumps(entry)
    out.write_text("\n".join(lines) + "\n")
    bad = run_cli(database_url, tmp_path, "audit", "verify-export", str(out))
    assert bad.returncode == 1 and "seq 4" in bad.stderr

