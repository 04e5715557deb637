"""A screening classifier named in policy that cannot load stops `loragate serve` with a
message naming the missing file, unless policy marks it optional; either way what is
active is in the start-up audit row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import select

from audit.db import transaction
from audit.models import AuditEntry
from gateway.embedded import free_port
from policy.screening.screener import DEFAULT_SCREENING_PATH
from tests.api.helpers import TINY
from tests.conftest import run_server, tiny_settings


def policy_with_missing_rules(tmp_path, optional: bool):
    missing = tmp_path / "missing-rules.toml"
    text = DEFAULT_SCREENING_PATH.read_text().replace(
        "[classifiers.rules]\nenabled = true\noptional = false\nfiles = []",
        f"[classifiers.rules]\nenabled = true\noptional = {str(optional).lower()}\n"
        f'files = ["{missing}"]')
    assert str(missing) in text
    path = tmp_path / "screening.toml"
    path.write_text(text)
    return path, missing


def test_a_required_classifier_that_cannot_load_stops_serve_naming_the_file(models_dir,
                                                                            database_url,
                                                                            tmp_path):
    policy, missing = policy_with_missing_rules(tmp_path, optional=False)
    env = {**os.environ, "LORAGATE_DATABASE_URL": database_url, "LORAGATE_BASE_MODELS": TINY,
           "LORAGATE_SCREENING_FILE": str(policy)}
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port",
                           str(free_port()), "--data-dir", str(models_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout


def test_an_optional_one_is_listed_inactive_in_the_start_up_audit_row(models_dir,
                                                                     database_url, tmp_path):
    policy, missing = policy_with_missing_rules(tmp_path, optional=True)
    settings = tiny_settings(models_dir, database_url, run_worker=False, screening_file=policy)
    with run_server(settings) as server, transaction(server.state.read_factory) as session:
        row = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "gateway.start").order_by(AuditEntry.seq.desc())).first()
    screening = json.loads(row.payload)["screening"]
    assert "rules" in screening["inactive"] and str(missing) in screening["inactive"]["rules"]
    active = {c["name"]: c["version"] for c in screening["active"]}
    assert active["harmful_content"].startswith("harmclf-") and "structural" in active
    assert "harmful_request" in screening["inactive"]  # the bank screen: operators enable it
