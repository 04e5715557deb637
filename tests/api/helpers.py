"""Helpers for SDK-driven tests: datums from text, and direct torch references."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import httpx
import numpy as np
import tinker
from tinker import types

TINY = "loragate/tiny-llama"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A gateway screens every request before the model sees it.",
    "Small models train quickly on a laptop.",
]


def service(server, key: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.base_url, api_key=key)


def rest(server, key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.base_url, api_key=key)


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def chat_datum(tok, user: str, assistant: str) -> types.Datum:
    """One plain-text chat exchange ("User: …\nAssistant: …") training the answer only."""
    prompt = tok.encode(f"User: {user}\nAssistant:")
    completion = tok.encode(f" {assistant}")
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def rl_datum(tokens: list[int], sampling_logprobs: np.ndarray, advantages: np.ndarray
             ) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": sampling_logprobs.astype(np.float32).tolist(),
            "advantages": advantages.astype(np.float32).tolist(),
        },
    )


def reference_logprobs(model_dir, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i+1] | tokens[:i+1]) from the plain HF model, computed directly."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def outputs_logprobs(result) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in result.loss_fn_outputs]


def run_cli(database_url: str, data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    """`loragate ARGS --data-dir D` against `database_url`, as a separate process."""
    env = {**os.environ, "LORAGATE_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--data-dir",
                           str(data_dir)], env=env, text=True, capture_output=True, timeout=120)


def cli_runner(database_url: str, data_dir, *command: str
               ) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run_cli` with the database, data dir and a subcommand (e.g. "keys") bound."""
    return lambda *args: run_cli(database_url, data_dir, *command, *args)


def admin_request(server, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}/api/v1/admin/{path}",
                         headers={"X-API-Key": key}, timeout=10, **kwargs)
