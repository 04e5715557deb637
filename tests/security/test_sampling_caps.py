"""Base-model caps cannot be routed around, on SQLite and PostgreSQL.

An untrained or near-zero adapter samples the base model, so the cap on top-k logprobs (of
the prompt and of sampled tokens) holds for every sampler — the bare base model, an
untrained adapter's snapshot, a named checkpoint, trained or not — unless the key's scope
raises it. Prompt scoring is charged to the key's quota: every prompt token a sampling
request scores (prompt logprobs or their top-k, which is what `compute_logprobs` asks
for) counts as a sampled token, and forward-only scoring counts its tokens as training
tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import module_server

PROMPT = types.ModelInput.from_ints([5, 6, 7, 8, 9, 10])
GREEDY = types.SamplingParams(max_tokens=2, temperature=0.0, stop=[])


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with module_server(request.param, models_dir,
                       tmp_path_factory.mktemp("sampling-caps")) as live:
        yield live


def refused(match: str):
    """A 403 the SDK raises at once, with the gateway's reason."""
    return pytest.raises(tinker.PermissionDeniedError, match=match)


def today(server: LiveServer, key: str) -> dict:
    resp = httpx.get(f"{server.base_url}/api/v1/usage", headers={"X-API-Key": key},
                     timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["keys"][0]["today"]


def _samplers(sc: tinker.ServiceClient) -> dict[str, tinker.SamplingClient]:
    """An untrained adapter's snapshot (it samples the base exactly), a named untrained
    checkpoint, a checkpoint after a training step, and the bare base."""
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    untrained = trainer.save_weights_and_get_sampling_client().result()
    named = sc.create_sampling_client(
        model_path=trainer.save_weights_for_sampler("untrained").result().path).result()
    trainer.forward_backward([sft_datum(trainer.get_tokenizer(), TEXTS[0])],
                             "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    trained = sc.create_sampling_client(
        model_path=trainer.save_weights_for_sampler("trained").result().path).result()
    return {"untrained snapshot": untrained, "untrained checkpoint": named,
            "trained checkpoint": trained,
            "base": sc.create_sampling_client(base_model=TINY).result()}


def test_the_top_k_cap_holds_for_every_sampler_not_only_the_bare_base(server):
    sc = service(server, server.create_key(scopes={"max_base_topk_logprobs": 2}))
    for name, sampler in _samplers(sc).items():
        with refused("top-k logprobs of 5 exceed this API key's maximum of 2"):
            sampler.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True,
                           topk_prompt_logprobs=5).result()
        with refused("top-k logprobs of 3 exceed this API key's maximum of 2"):
            sampler.sample(PROMPT, 1, GREEDY, topk_sample_logprobs=3).result()
        ok = sampler.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True,
                            topk_prompt_logprobs=2, topk_sample_logprobs=2).result()
        assert len(ok.topk_prompt_logprobs[1]) == 2, name
        assert [len(row) for row in ok.sequences[0].topk_logprobs] == [2, 2], name
    sc.close("success").result()


def test_a_key_whose_scope_raises_the_cap_gets_more_top_k_from_every_sampler(server):
    sc = service(server, server.create_key(scopes={"max_base_topk_logprobs": 8}))
    for name, sampler in _samplers(sc).items():
        out = sampler.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True,
                             topk_prompt_logprobs=8).result()
        assert len(out.topk_prompt_logprobs[1]) == 8, name
    sc.close("success").result()


def test_prompt_scoring_is_charged_as_sampled_tokens(server):
    key = server.create_key()
    sc = service(server, key)
    base = sc.create_sampling_client(base_model=TINY).result()
    plain = base.sample(PROMPT, 1, GREEDY).result()
    generated = len(plain.sequences[0].tokens)
    assert today(server, key)["sampled_tokens"] == generated  # no scoring, nothing extra
    scored = base.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True).result()
    charged = generated + len(scored.sequences[0].tokens) + PROMPT.length
    assert today(server, key)["sampled_tokens"] == charged
    logprobs = base.compute_logprobs(PROMPT).result()
    assert len(logprobs) == PROMPT.length
    used = today(server, key)
    assert used["sampled_tokens"] == charged + PROMPT.length + 1  # it generates one token
    assert used["sampled_tokens_reserved"] == 0
    sc.close("success").result()


def test_prompt_scoring_beyond_the_day_budget_is_refused(server):
    sc = service(server, server.create_key(scopes={"sampled_tokens_per_day": 10}))
    base = sc.create_sampling_client(base_model=TINY).result()
    long_prompt = types.ModelInput.from_ints(list(range(5, 25)))
    base.sample(long_prompt, 1, GREEDY).result()  # 2 sampled tokens: within the budget
    with refused("quota sampled_tokens_per_day exceeded: this request needs 21 sampled "
                 "tokens"):
        base.compute_logprobs(long_prompt).result()
    sc.close("success").result()


def test_forward_only_scoring_is_charged_as_training_tokens(server):
    key = server.create_key()
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    datum = sft_datum(trainer.get_tokenizer(), TEXTS[1])
    trainer.forward([datum], "cross_entropy").result()
    assert today(server, key)["training_tokens"] == datum.model_input.length
    sc.close("success").result()
    tight = service(server, server.create_key(
        scopes={"training_tokens_per_day": datum.model_input.length - 1}))
    scorer = tight.create_lora_training_client(base_model=TINY, rank=4).result()
    with refused("quota training_tokens_per_day exceeded"):
        scorer.forward([datum], "cross_entropy").result()
    tight.close("success").result()
