"""The SDK's outer retry loop can resubmit a request whose response was lost, with a new
idempotency key: the gateway deduplicates on (model_id, seq_id), so the work runs once."""

from __future__ import annotations

import httpx

ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
        "weight_decay": 0.0, "grad_clip_norm": 0.0}


def _optim(server, key: str, model_id: str, seq_id: int, lr: float) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/optim_step", timeout=10,
                      headers={"X-API-Key": key},
                      json={"model_id": model_id, "seq_id": seq_id, "type": "optim_step",
                            "adam_params": {**ADAM, "learning_rate": lr}})


def test_a_resubmitted_request_maps_to_the_same_future(server, api_key, trainer):
    model_id = trainer.get_info().model_id
    first = _optim(server, api_key, model_id, 500, 1e-3)
    again = _optim(server, api_key, model_id, 500, 1e-3)
    assert first.status_code == again.status_code == 200
    assert first.json()["request_id"] == again.json()["request_id"]


def test_reusing_a_seq_id_for_a_different_request_is_refused(server, api_key, trainer):
    model_id = trainer.get_info().model_id
    assert _optim(server, api_key, model_id, 600, 1e-3).status_code == 200
    clash = _optim(server, api_key, model_id, 600, 2e-3)
    assert clash.status_code == 400 and "already used" in clash.json()["detail"]
