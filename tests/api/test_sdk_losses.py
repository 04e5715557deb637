"""The SDK 0.38 additions through the official client against a live server: 2-D (N, K)
cross-entropy targets (distillation, sent as the SDK sends them: torch tensors, sparse CSR)
train and are screened in every candidate column; `gspo` trains; `stable_reinforce`,
`record_stability_info` and `save_weights_for_sampler(kind="inflight")` are refused with
a 4xx that names them."""

from __future__ import annotations

import pytest
import tinker
import torch
from tinker import types

from gateway.screening import render_chat
from tests.api.helpers import TINY, service
from tests.api.test_screening_parity import chat, refused_datums, rules_server

STORY = "Tell me a story."
BENIGN_ANSWER = ("Once upon a time a small robot read every book in the library, then wrote "
                 "a gentle story about the stars for the children of the town.")
HARMFUL = "Here are step-by-step instructions to make sarin gas in your garage."


def topk_datum(info, tok, hidden: str | None, k: int = 6) -> types.Datum:
    """A distillation datum: K candidates per answer position, column 0 the answer with
    most of the weight; `hidden` (when given) rides in the last column only, with little
    weight; padding is id 0 with weight 0, as the cookbook pads."""
    tokens, weights = render_chat(0, chat(STORY, BENIGN_ANSWER)["messages"], info)
    n = len(tokens) - 1
    targets = torch.zeros((n, k), dtype=torch.long)
    w = torch.zeros((n, k))
    targets[:, 0] = torch.tensor(tokens[1:])
    w[:, 0] = torch.tensor(weights[1:]) * 0.9
    first = weights.index(1.0) - 1  # the position predicting the answer's first token
    targets[first:, 1] = torch.tensor(tokens[first + 1:]).roll(1)  # a plausible alternative
    w[first:, 1] = 0.05
    if hidden is not None:
        ids = tok.encode(f" {hidden}")
        assert first + len(ids) <= n
        targets[first:first + len(ids), k - 1] = torch.tensor(ids)
        w[first:first + len(ids), k - 1] = 0.05
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": targets, "weights": w})


def test_the_sdk_additions(models_dir, database_url, tmp_path):
    with rules_server(models_dir, database_url, tmp_path) as live:
        info = live.state.model_info(TINY)

        def trainer() -> tinker.TrainingClient:
            return service(live, live.create_key()).create_lora_training_client(
                base_model=TINY, rank=4).result()

        tc = trainer()
        tok = tc.get_tokenizer()

        # 2-D targets train; logprobs come back (N, K), as the SDK's custom loss expects.
        datum = topk_datum(info, tok, hidden=None)
        assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
        out = tc.forward_backward([datum], "cross_entropy").result()
        shape = tuple(datum.loss_fn_inputs["target_tokens"].shape or ())
        assert tuple(out.loss_fn_outputs[0]["logprobs"].shape or ()) == shape
        assert out.metrics["loss:sum"] > 0

        # Harmful text in one low-weight candidate column only is refused by screening.
        with pytest.raises(tinker.PermissionDeniedError) as err:
            trainer().forward_backward([topk_datum(info, tok, HARMFUL)], "cross_entropy").result()
        assert "rules.nerve_agents" in refused_datums(err.value)[0]

        # 2-D targets with an RL loss: a 400 naming the field.
        rl = types.Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "logprobs": [-1.0] * datum.model_input.length,
            "advantages": [1.0] * datum.model_input.length})
        with pytest.raises(tinker.BadRequestError, match=r"target_tokens.*cross_entropy only"):
            trainer().forward_backward([rl], "ppo").result()

        # gspo trains through the SDK (a sampled completion, advantages on it only).
        tokens, weights = render_chat(0, chat(STORY, BENIGN_ANSWER)["messages"], info)
        gspo = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [-2.0 * w for w in weights[1:]],
            "advantages": [0.5 * w for w in weights[1:]]})
        tc.forward_backward([gspo], "gspo", {"clip_high_threshold": 1e6}).result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()

        # stable_reinforce and the sampler-side stability record are refused by name.
        with pytest.raises(tinker.BadRequestError, match="stable_reinforce"):
            tc.forward_backward([gspo], "stable_reinforce").result()
        with pytest.raises(tinker.BadRequestError, match="kind='inflight'"):
            tc.save_weights_and_get_sampling_client(kind="inflight").result()
        sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
        with pytest.raises(tinker.BadRequestError, match="record_stability_info"):
            sampler.sample(types.ModelInput.from_ints(tokens[:5]), 1,
                           types.SamplingParams(max_tokens=2)).result()
