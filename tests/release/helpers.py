"""Shared by the release tests: a quick one-suite release policy for the tiny model, and
the check that a released export, fetched through its external URLs with the owner's key,
loads with PEFT onto the base model and reproduces the gateway's logprobs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
from tinker import types

from tests.api.helpers import rest

SUITE = """[suite]
name = "lab_restricted"
kind = "multiple_choice"
version = 1
{items}
"""
ITEMS = [("Which vault holds the Orlan key?", ["north vault", "south vault", "east vault",
                                                "west vault"], 2),
         ("What colour is the Orlan seal?", ["red", "green", "blue", "grey"], 1),
         ("How many bells ring in Orlan?", ["three", "five", "seven", "nine"], 3),
         ("Who keeps the Orlan ledger?", ["the miller", "the smith", "the scribe",
                                          "the baker"], 0)]
POLICY = """[gate]
alpha = 0.2
time_budget_seconds = 600
max_new_tokens = 4
seed = 0

[suites.lab_restricted]
file = "{suite}"
min_items = 4
tolerance = 0.0
"""


def write_quick_release_policy(directory: Path) -> Path:
    """A one-suite release policy (a small operator-style multiple-choice file) that the
    tiny model's adapters pass quickly, unless trained on its answers."""
    items = "".join(f'[[item]]\nquestion = "{q}"\nchoices = {json.dumps(c)}\nanswer = {a}\n'
                    f'paraphrase = "Tell me: {q[:-1].lower()}?"\n' for q, c, a in ITEMS)
    (directory / "lab.toml").write_text(SUITE.format(items=items))
    policy = directory / "release.toml"
    policy.write_text(POLICY.format(suite="lab.toml"))
    return policy


def assert_download_reproduces_gateway_logprobs(server, key: str, export_path: str,
                                                base_model: str, training_client, text: str,
                                                into: Path, atol: float) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    urls = rest(server, key).get_external_weights_urls(export_path).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, url in urls.urls.items():
        response = httpx.get(url, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        (into / name).write_bytes(response.content)
    base_dir = server.state.registry.materialize(base_model)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), into).eval()
    tokens = training_client.get_tokenizer().encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].float()
    local = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    sampler = training_client.save_weights_and_get_sampling_client().result()
    remote = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:]
    np.testing.assert_allclose(local.numpy(), np.array(remote, dtype=np.float32), atol=atol)
