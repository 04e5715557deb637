"""The CLI contract other tools rely on, and the audit promise that every API call —
allowed or refused — leaves exactly one row, without secrets in it."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select, text

from audit.db import transaction
from audit.models import AuditEntry
from tests.api.helpers import TEXTS, TINY, run_cli, service, sft_datum


def test_keys_create_prints_the_key_alone_and_audit_verify_passes(database_url, tmp_path):
    out = run_cli(database_url, tmp_path, "keys", "create", "--role", "researcher", "--owner",
                  "alice")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tml-") and len(lines[0]) > 30
    verify = run_cli(database_url, tmp_path, "audit", "verify")
    assert verify.returncode == 0 and "OK" in verify.stdout


def test_keys_create_refuses_a_role_change_for_an_existing_owner(database_url, tmp_path):
    assert run_cli(database_url, tmp_path, "keys", "create", "--role", "researcher", "--owner",
                   "bob").returncode == 0
    out = run_cli(database_url, tmp_path, "keys", "create", "--role", "admin", "--owner", "bob")
    assert out.returncode == 2 and "already exists with role" in out.stderr and not out.stdout


def test_screening_reinstate_lifts_a_persons_block_audited_as_cli(database_url, tmp_path):
    from audit.db import make_engine, make_sessionmaker
    from audit.models import Principal

    assert run_cli(database_url, tmp_path, "keys", "create", "--role", "researcher",
                   "--owner", "carol").returncode == 0
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        person = session.scalars(select(Principal).where(Principal.name == "carol")).one()
        person.screening_blocked_reason, person.flagged_datums = "5 of 9 flagged", 5
    missing = run_cli(database_url, tmp_path, "screening", "reinstate", "nobody", "--reason",
                      "x")
    assert missing.returncode == 2 and "no principal" in missing.stderr
    out = run_cli(database_url, tmp_path, "screening", "reinstate", "carol", "--reason",
                  "reviewed: recipe data")
    assert out.returncode == 0, out.stderr
    with transaction(factory) as session:
        person = session.scalars(select(Principal).where(Principal.name == "carol")).one()
        assert person.screening_blocked_reason is None and person.flagged_datums == 0
        row = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "screening.principal_reinstated")).one()
        assert row.actor == "cli" and row.subject == person.id
    engine.dispose()


def test_audit_verify_exits_1_naming_the_first_bad_seq(database_url, tmp_path):
    for owner in ("a", "b", "c"):
        run_cli(database_url, tmp_path, "keys", "create", "--role", "researcher", "--owner", owner)
    from audit.db import make_engine, make_sessionmaker

    engine = make_engine(database_url)
    with transaction(make_sessionmaker(engine)) as session:
        if engine.dialect.name == "postgresql":
            session.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        else:
            session.execute(text("DROP TRIGGER audit_log_no_update"))
        session.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    engine.dispose()
    out = run_cli(database_url, tmp_path, "audit", "verify")
    assert out.returncode == 1 and "seq 2" in out.stderr


def _rows(server) -> int:
    with transaction(server.state.read_factory) as session:
        return session.scalar(select(func.count()).select_from(AuditEntry)) or 0


@pytest.mark.parametrize("method, path, headers, status", [
    ("POST", "client/config", "good", 200),
    ("GET", "training_runs", "good", 200),
    ("POST", "client/config", "bad", 401),
    ("POST", "client/config", "none", 401),
    ("GET", "training_runs/nope:train:0", "good", 404),
    ("POST", "create_model", "good", 422),
    ("GET", "no/such/endpoint", "good", 404),
])
def test_every_call_allowed_or_refused_leaves_exactly_one_row(server, api_key, method, path,
                                                              headers, status):
    hdrs = {"good": {"X-API-Key": api_key}, "bad": {"X-API-Key": "tml-wrong"}, "none": {}}
    before = _rows(server)
    resp = httpx.request(method, f"{server.base_url}/api/v1/{path}", headers=hdrs[headers],
                         json={} if method == "POST" else None, timeout=10)
    assert resp.status_code == status
    assert resp.headers["X-Request-Id"].startswith("req-")
    assert _rows(server) == before + 1
    with transaction(server.state.read_factory) as session:
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.seq.desc())).first()
    assert last.request_id == resp.headers["X-Request-Id"]
    assert last.decision == ("allow" if status == 200 else "deny")


def test_no_key_or_training_text_reaches_the_audit_table(server):
    key = server.create_key()
    sc = service(server, key)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tok = tc.get_tokenizer()
    tc.forward_backward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    from tinker import types

    out = sampler.sample(types.ModelInput.from_ints(tok.encode(TEXTS[1])), 1,
                         types.SamplingParams(max_tokens=8, seed=0)).result()
    sampled = tok.decode(out.sequences[0].tokens)
    sc.close("success").result()
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry)).all()
    blob = "\n".join(f"{r.actor} {r.subject} {r.payload}" for r in rows)
    assert key not in blob and key[4:] not in blob
    assert TEXTS[0] not in blob and TEXTS[1] not in blob
    if len(sampled.strip()) > 8:
        assert sampled not in blob
