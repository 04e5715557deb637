"""Shared check for the release tests: a released export, fetched through its external URLs
with the owner's key, loads with PEFT onto the base model and reproduces the gateway's
logprobs."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from tinker import types

from tests.api.helpers import rest


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
