"""The screening tally per person, through the official SDK on the tiny model (SQLite and
PostgreSQL), with the deterministic marker screen of test_dataset_decisions: evidence left
behind in one run or in a dry run still counts.

(a) An attacker screens a poisoned dataset with the dry run (which names the flagged
    examples) in pieces each below a run's bar, then trains only what passed: the pieces
    add up in their own tally, judged with their first training batch, so they are
    blocked, and their runs and new runs are refused — until an admin reviews and
    reinstates them.
(b) An attacker trains a poisoned dataset in fresh runs, each stopped before its own bar:
    blocked within the first 400 examples all the same.
(c) An honest person's everyday data, dry-run and then trained, is counted once and never
    blocks them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
import tinker

from tests.api.helpers import TINY, admin_request, service
from tests.api.test_dataset_decisions import (
    BATCH,
    MARKER_CORPUS,
    Example,
    Gate,
    live_gate,
    marker_everyday,
    marker_harmful,
    train,
)
from tests.api.test_screening_parity import rendered_datum
from tests.conftest import _dialects


@pytest.fixture(scope="module", params=_dialects())
def gate(request, models_dir, tmp_path_factory) -> Iterator[Gate]:
    yield from live_gate(request.param, MARKER_CORPUS, models_dir,
                         tmp_path_factory.mktemp(f"person-{request.param}"))


def poisoned(n: int, seed: int, share: float = 0.05) -> list[Example]:
    rng = random.Random(seed)
    harmful = int(n * share)
    data = marker_everyday(n - harmful, rng) + marker_harmful(harmful, rng)
    rng.shuffle(data)
    return data


def chat(example: Example) -> dict:
    user, assistant = example
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def dry_run(gate: Gate, key: str, examples: list[Example]) -> httpx.Response:
    body = {"base_model": TINY, "examples": [chat(ex) for ex in examples]}
    return httpx.post(f"{gate.server.base_url}/api/v1/screening/dry_run", json=body,
                      headers={"X-API-Key": key}, timeout=120)


def new_run(gate: Gate, key: str) -> tinker.TrainingClient:
    return service(gate.server, key).create_lora_training_client(
        base_model=TINY, rank=4, seed=0).result()


def test_dry_runs_cannot_launder_a_poisoned_dataset(gate):
    key, admin = gate.server.create_key(), gate.server.create_key(role="admin")
    tc = new_run(gate, key)  # a run made before the dry runs
    data, passed = poisoned(400, seed=1), []
    for i in range(0, len(data), 50):  # pieces of 50: each below a run's bar on its own
        resp = dry_run(gate, key, data[i:i + 50])
        assert resp.status_code == 200  # a dry run decides nothing by itself
        flagged = {f["index"] for f in resp.json()["flagged"]}
        assert len(flagged) <= 5  # 6 of 50 would block a run by itself
        passed += [ex for j, ex in enumerate(data[i:i + 50]) if j not in flagged]
    # Training only what passed: the first batch is judged with everything dry-run.
    outcome = train(new_run(gate, key), passed)
    assert outcome.blocked and "you are now blocked by screening" in outcome.blocked
    assert outcome.refused == 0 and not outcome.losses
    # Nothing of theirs trains now, and they start no run and no dry run.
    resp = dry_run(gate, key, passed[:4])
    assert resp.status_code == 403 and resp.json()["code"] == "run_blocked"
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        new_run(gate, key)
    outcome = train(tc, passed[:BATCH])  # the earlier run too
    assert outcome.blocked and "blocked by screening" in outcome.blocked and not outcome.losses
    keys = admin_request(gate.server, admin, "GET", "keys").json()["keys"]
    [mine] = [k for k in keys if key.startswith(k["prefix"])]
    assert mine["owner_screening"]["blocked"] and mine["owner_screening"]["flagged"] >= 16
    # An admin reviews the evidence and reinstates them (never themselves; a reason is due).
    path = f"principals/{mine['owner_id']}/screening/reinstate"
    assert admin_request(gate.server, admin, "POST", path, json={}).status_code == 422
    assert admin_request(gate.server, key, "POST", path,
                         json={"reason": "me"}).status_code == 403
    assert admin_request(gate.server, admin, "POST", "principals/nobody/screening/reinstate",
                         json={"reason": "x"}).status_code == 404
    ok = admin_request(gate.server, admin, "POST", path, json={"reason": "reviewed"})
    assert ok.status_code == 200 and ok.json()["screening"]["blocked"] is None
    assert dry_run(gate, key, passed[:4]).status_code == 200
    assert train(new_run(gate, key), passed[:BATCH]).blocked is None


def test_fresh_runs_cannot_split_a_poisoned_dataset(gate):
    key = gate.server.create_key()
    data, sent, outcome = poisoned(400, seed=2), 0, None
    for i in range(0, len(data), 3 * BATCH):  # a new run every 96 examples
        try:
            tc = new_run(gate, key)
        except tinker.PermissionDeniedError as exc:
            assert "blocked by screening" in str(exc)
            break
        outcome = train(tc, data[i:i + 3 * BATCH])
        sent += outcome.sent
        if outcome.blocked:
            break
    else:
        pytest.fail("the person was never blocked")
    assert sent <= 400
    if outcome is not None and outcome.blocked:
        assert "blocked by screening" in outcome.blocked


def test_an_honest_persons_dry_runs_and_runs_never_block_them(gate):
    key = gate.server.create_key()
    data = marker_everyday(600, random.Random(3))
    resp = dry_run(gate, key, data)
    assert resp.status_code == 200 and len(resp.json()["flagged"]) == 6
    flagged = {f["index"] for f in resp.json()["flagged"]}
    # Trained as the dry run renders them (the base model's chat template): a dry-run
    # example that is then trained is the same datum, counted once.
    info = gate.server.state.model_info(TINY)
    kept = [rendered_datum(info, chat(ex)) for j, ex in enumerate(data) if j not in flagged]
    tc = new_run(gate, key)
    for i in range(0, len(kept), BATCH):
        tc.forward_backward(kept[i:i + BATCH], "cross_entropy").result()
    # The person sees their own tally in their usage report.
    usage = httpx.get(f"{gate.server.base_url}/api/v1/usage", headers={"X-API-Key": key},
                      timeout=30).json()
    mine = usage["keys"][0]["owner_screening"]
    assert (mine["screened"], mine["flagged"], mine["blocked"]) == (600, 6, None)
    outcome = train(new_run(gate, key), marker_everyday(600, random.Random(4)))
    assert outcome.blocked is None and outcome.refused == 6
