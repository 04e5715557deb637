"""After a full SDK session against `loragate serve` — access request, claim, training,
sampling, telemetry that echoes the key — neither the audit table nor the JSON logs hold
an API key, a claim token, training text or sampled text; and the log lines carry the
request ids of the audit rows."""

from __future__ import annotations

import json
import os
import uuid

import httpx
import tinker
from sqlalchemy import select
from tinker import types

from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import AuditEntry
from gateway.embedded import serve_in_subprocess
from tests.api.helpers import TINY, run_cli, sft_datum

SECRET_TEXT = "Quokka marmalade ziggurat whispers the launch code"


def test_no_key_token_or_text_reaches_the_audit_table_or_the_logs(models_dir, database_url,
                                                                  tmp_path):
    admin = run_cli(database_url, models_dir, "keys", "create", "--role", "admin", "--owner",
                    f"admin-{uuid.uuid4().hex[:6]}").stdout.strip()
    env = {**os.environ, "LORAGATE_DATABASE_URL": database_url, "LORAGATE_BASE_MODELS": TINY}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log, serve_in_subprocess(models_dir, env=env, log=log) as url:
        filed = httpx.post(f"{url}/api/v1/access_requests", timeout=10, json={
            "name": f"r-{uuid.uuid4().hex[:6]}", "contact": "r@lab.example",
            "purpose": "tests", "base_models": [TINY]}).json()
        token = filed["claim_token"]
        httpx.post(f"{url}/api/v1/admin/access_requests/{filed['request_id']}/approve",
                   headers={"X-API-Key": admin}, json={}, timeout=10).raise_for_status()
        key = httpx.post(f"{url}/api/v1/access_requests/claim", json={"claim_token": token},
                         timeout=10).json()["key"]
        # A claim token presented as a key, and telemetry echoing the key in clear.
        httpx.post(f"{url}/api/v1/client/config", headers={"X-API-Key": token}, timeout=10)
        httpx.post(f"{url}/api/v1/telemetry", headers={"X-API-Key": key}, timeout=10,
                   json={"events": [{"event": "UNHANDLED_EXCEPTION", "severity": "ERROR",
                                     "error_type": "AuthenticationError",
                                     "error_message": f"rejected X-API-Key {key}",
                                     "event_data": {"X-API-Key": key, "text": SECRET_TEXT}}]})

        sc = tinker.ServiceClient(base_url=url, api_key=key)
        trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
        tok = trainer.get_tokenizer()
        trainer.forward_backward([sft_datum(tok, SECRET_TEXT)], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = trainer.save_weights_and_get_sampling_client().result()
        out = sampler.sample(types.ModelInput.from_ints(tok.encode(SECRET_TEXT)), 1,
                             types.SamplingParams(max_tokens=24, seed=3, stop=[])).result()
        sampled_text = tok.decode(out.sequences[0].tokens)
        sc.close("success").result()

    engine = make_engine(database_url, read_only=True)
    with transaction(make_sessionmaker(engine)) as session:
        rows = session.execute(select(AuditEntry)).scalars().all()
        audit_text = "\n".join(" ".join([r.actor, r.event_type, r.subject, r.request_id,
                                         r.payload]) for r in rows)
        request_ids = {r.request_id for r in rows if r.request_id.startswith("req-")}
    engine.dispose()
    logs = log_path.read_text()
    assert len(sampled_text.strip()) >= 12, "the sample is too short to search for"
    for secret in (admin, key, token, SECRET_TEXT, sampled_text.strip()):
        assert secret not in audit_text
        assert secret not in logs
    assert "tml-[REDACTED]" in logs  # the telemetry echo was logged, redacted
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    logged_ids = {line.get("request_id") for line in lines if line.get("event") == "request"}
    assert request_ids and request_ids <= logged_ids  # every audited request is in the log
