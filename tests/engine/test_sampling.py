"""Sampling with a KV cache: reproducibility, greedy decoding against a no-cache recompute,
stop tokens and strings, logprobs and top-k logprobs, and input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.errors import UserInputError
from engine.torch_backend import TorchBackend
from engine.values import SampleSpec

from .conftest import ReferenceLora, train_step

PROMPT = (1, 40, 41, 42, 43)
NO_STOP: dict = {"stop_token_ids": (), "stop_strings": ()}


def greedy(backend: TorchBackend, adapter: str | None, n: int, **kw) -> list[int]:
    spec = SampleSpec(prompt=PROMPT, max_tokens=n, temperature=0.0, **{**NO_STOP, **kw})
    return backend.sample(adapter, spec).sequences[0].tokens


def no_cache_greedy(ref: ReferenceLora, n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by recomputing the whole sequence at every step (no KV cache)."""
    seq, logps = list(PROMPT), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(ref.logits(seq)[-1], dim=-1)
            token = int(logp.argmax())
            seq.append(token)
            logps.append(float(logp[token]))
    return seq[len(PROMPT) :], logps


@pytest.mark.parametrize("trained", [False, True])
def test_kv_cache_greedy_decoding_equals_no_cache_full_recompute(
    backend, new_adapter, reference, trained
):
    adapter = None
    weights = None
    if trained:
        adapter = new_adapter(rank=4, seed=3)
        train_step(backend, adapter, lr=0.1)
        weights = backend.adapter_tensors(adapter)
    spec = SampleSpec(prompt=PROMPT, max_tokens=12, temperature=0.0, num_samples=2, **NO_STOP)
    result = backend.sample(adapter, spec)
    with reference.lora(weights, rank=4):
        tokens, logps = no_cache_greedy(reference, 12)
    for seq in result.sequences:
        assert seq.tokens == tokens and seq.stopped is False
        assert seq.logprobs == pytest.approx(logps, abs=1e-4)


def test_same_seed_gives_the_same_samples_and_another_seed_differs(backend):
    spec = SampleSpec(prompt=PROMPT, max_tokens=16, num_samples=3, seed=123, **NO_STOP)
    first = [s.tokens for s in backend.sample(None, spec).sequences]
    torch.manual_seed(999)  # global RNG state must not matter
    again = [s.tokens for s in backend.sample(None, spec).sequences]
    other = [s.tokens for s in backend.sample(None, dataclasses.replace(spec, seed=7)).sequences]
    assert first == again
    assert first != other
    assert len({tuple(t) for t in first}) > 1  # the samples of one request differ


def test_top_k_one_and_tiny_top_p_reduce_to_greedy(backend):
    chain = greedy(backend, None, 8)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        spec = SampleSpec(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, **NO_STOP, **kw)
        assert backend.sample(None, spec).sequences[0].tokens == chain


def test_top_k_restricts_draws_to_the_k_most_likely_tokens(backend):
    spec = SampleSpec(
        prompt=PROMPT,
        max_tokens=1,
        num_samples=64,
        top_k=3,
        seed=1,
        topk_sample_logprobs=3,
        **NO_STOP,
    )
    result = backend.sample(None, spec)
    allowed = {token for token, _ in result.sequences[0].topk[0]}
    assert {s.tokens[0] for s in result.sequences} <= allowed


def test_sampled_logprobs_are_the_unmodified_distribution(backend, reference):
    spec = SampleSpec(prompt=PROMPT, max_tokens=1, temperature=0.3, top_k=5, seed=0, **NO_STOP)
    seq = backend.sample(None, spec).sequences[0]
    with torch.no_grad():
        logp = torch.log_softmax(reference.logits(list(PROMPT))[-1], dim=-1)
    assert seq.logprobs[0] == pytest.approx(float(logp[seq.tokens[0]]), abs=1e-5)


def test_stop_token_is_included_and_marks_the_sequence_stopped(backend):
    chain = greedy(backend, None, 10)
    stop_at = next(i for i in range(2, 10) if chain[i] not in chain[:i])
    tokens = greedy(backend, None, 10, stop_token_ids=(chain[stop_at],))
    spec = SampleSpec(
        prompt=PROMPT, max_tokens=10, temperature=0.0, stop_token_ids=(chain[stop_at],)
    )
    seq = backend.sample(None, spec).sequences[0]
    assert tokens == chain[: stop_at + 1] == seq.tokens
    assert seq.stopped is True


def test_max_tokens_reached_means_not_stopped(backend):
    seq = backend.sample(None, SampleSpec(prompt=PROMPT, max_tokens=7, seed=1, **NO_STOP))
    assert len(seq.sequences[0].tokens) == 7 and seq.sequences[0].stopped is False
    assert len(seq.sequences[0].logprobs) == 7


def test_default_stop_is_the_models_eos_and_empty_lists_disable_it(backend, tiny_dir):
    chain = greedy(backend, None, 10)
    stop_at = next(i for i in range(2, 10) if chain[i] not in chain[:i])
    info = dataclasses.replace(backend.info, eos_token_ids=(chain[stop_at],))
    with_eos = TorchBackend(tiny_dir, info, device="cpu")
    default = SampleSpec(prompt=PROMPT, max_tokens=10, temperature=0.0)
    assert with_eos.sample(None, default).sequences[0].tokens == chain[: stop_at + 1]
    disabled = dataclasses.replace(default, **NO_STOP)
    assert with_eos.sample(None, disabled).sequences[0].tokens == chain
    only_strings = dataclasses.replace(default, stop_strings=("\u2603 never",))
    assert with_eos.sample(None, only_strings).sequences[0].tokens == chain


def test_stop_string_stops_right_after_the_token_that_completes_it(backend):
    tokenizer = backend._tokenizer
    chain = greedy(backend, None, 12)

    def text(n: int) -> str:
        return tokenizer.decode(chain[:n], skip_special_tokens=False)

    # A stop string that first appears in the decoded text once token `end` is generated.
    end, stop = next(
        (i, text(i + 1)[-2:])
        for i in range(2, 12)
        if len(text(i + 1)) > len(text(i)) + 1 and text(i + 1)[-2:] not in text(i)
    )
    seq = greedy(backend, None, 12, stop_strings=(stop,))
    assert seq == chain[: end + 1]
    spec = SampleSpec(prompt=PROMPT, max_tokens=12, temperature=0.0, stop_strings=(stop,))
    assert backend.sample(None, spec).sequences[0].stopped is True


def test_prompt_logprobs_equal_a_forward_pass(backend, new_adapter, reference):
    adapter = new_adapter(seed=8)
    train_step(backend, adapter, lr=0.1)
    spec = SampleSpec(prompt=PROMPT, max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=4)
    result = backend.sample(adapter, spec)
    with reference.lora(backend.adapter_tensors(adapter), rank=4), torch.no_grad():
        logp = torch.log_softmax(reference.logits(list(PROMPT)), dim=-1)
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    expected = [float(logp[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))]
    assert result.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    rows = result.topk_prompt_logprobs
    assert rows is not None and len(rows) == len(PROMPT) and rows[0] is None
    for i, row in enumerate(rows[1:], start=1):
        assert row is not None and len(row) == 4
        values = [v for _, v in row]
        assert values == sorted(values, reverse=True)
        assert all(0 <= t < backend.vocab_size and v > -1000 for t, v in row)  # no sentinels
        assert row[0][0] == int(logp[i - 1].argmax())
        assert values[0] == pytest.approx(float(logp[i - 1].max()), abs=1e-5)


def test_topk_sample_logprobs_cover_every_generated_position(backend):
    spec = SampleSpec(
        prompt=PROMPT, max_tokens=6, temperature=0.0, topk_sample_logprobs=3, **NO_STOP
    )
    seq = backend.sample(None, spec).sequences[0]
    assert seq.topk is not None and len(seq.topk) == 6
    for token, logprob, row in zip(seq.tokens, seq.logprobs, seq.topk, strict=True):
        assert row[0][0] == token and row[0][1] == pytest.approx(logprob)
        assert [v for _, v in row] == sorted((v for _, v in row), reverse=True)
    plain = backend.sample(None, dataclasses.replace(spec, topk_sample_logprobs=0))
    assert plain.sequences[0].topk is None and plain.prompt_logprobs is None


def test_finished_samples_drop_out_while_others_continue(backend):
    chain = greedy(backend, None, 10)
    # Sample many continuations; stopping on the greedy second token ends some early.
    spec = SampleSpec(
        prompt=PROMPT, max_tokens=10, num_samples=8, seed=4, top_k=4, stop_token_ids=(chain[1],)
    )
    sequences = backend.sample(None, spec).sequences
    for seq in sequences:
        assert seq.stopped == (chain[1] in seq.tokens)
        if seq.stopped:
            assert seq.tokens[-1] == chain[1] and chain[1] not in seq.tokens[:-1]
        else:
            assert len(seq.tokens) == 10
    assert len(sequences) == 8
    assert {seq.stopped for seq in sequences} == {True, False}  # this seed gives both kinds


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt": (1, 10_000)},
        {"prompt": (1, -2)},
        {"max_tokens": 600},  # prompt + max_tokens > 512
        {"stop_token_ids": (10_000,)},
    ],
)
def test_ids_that_do_not_fit_the_model_are_refused_by_the_engine(backend, changes):
    """The engine's one guard (its isolation invariant); every other rule on a sampling
    request holds when its SampleSpec is built (tests/engine/test_values.py)."""
    spec = dataclasses.replace(SampleSpec(prompt=PROMPT, max_tokens=4), **changes)
    with pytest.raises(UserInputError):
        backend.sample(None, spec)


def test_sampling_an_unknown_adapter_is_a_user_error(backend):
    with pytest.raises(UserInputError, match="not loaded"):
        backend.sample("ghost", SampleSpec(prompt=PROMPT))


def test_switching_adapters_per_decoding_step_does_not_walk_the_model(backend, new_adapter,
                                                                     monkeypatch):
    """Every decoding step activates its adapter (or the bare base). PEFT's set_adapter and
    disable_adapter walk every module and parameter, which with 8 adapters loaded took three
    times as long as the step itself: activation sets the adapter only when it changes and
    never calls disable_adapter, and the base's tokens are those of the bare base model."""
    spec = SampleSpec(prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, num_samples=2,
                      **NO_STOP)
    adapters = [new_adapter(rank=4, seed=i) for i in range(3)]
    train_step(backend, adapters[0], lr=0.1)
    peft = backend._peft
    calls: list[str] = []
    monkeypatch.setattr(peft, "set_adapter",
                        lambda name, _set=peft.set_adapter: calls.append(name) or _set(name))
    monkeypatch.setattr(peft, "disable_adapter",
                        lambda: pytest.fail("disable_adapter walks the model"))
    base = [s.tokens for s in backend.sample(None, spec).sequences]
    trained = [s.tokens for s in backend.sample(adapters[0], spec).sequences]
    assert trained != base  # the trained adapter computes (its B is no longer zero)
    for adapter in (adapters[1], adapters[1], adapters[0], adapters[0]):
        backend.sample(adapter, spec)
    names = [backend._get(a).peft_name for a in adapters]
    assert calls == [names[1], names[0]]  # on each change, not once per step
    assert [s.tokens for s in backend.sample(adapters[0], spec).sequences] == trained
    assert [s.tokens for s in backend.sample(None, spec).sequences] == base
    for adapter in adapters:  # unloading them all unwraps the model: the bare base again
        backend.drop_adapter(adapter)
    assert [s.tokens for s in backend.sample(None, spec).sequences] == base


def test_draws_follow_the_distribution_and_never_pick_an_excluded_token():
    """choose_tokens draws by inverse CDF: each token at its probability (top-k/top-p
    exclusions and zero-probability tokens never), reproducibly per generator."""
    from engine.decoding import choose_tokens

    probs = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.125] + [0.0] * 49147)
    logits = torch.log(probs).repeat(4000, 1)  # -inf where the probability is 0
    spec = SampleSpec(prompt=PROMPT, temperature=1.0, **NO_STOP)
    drawn = choose_tokens(logits, spec, torch.Generator().manual_seed(5))
    assert torch.equal(drawn, choose_tokens(logits, spec, torch.Generator().manual_seed(5)))
    share = torch.bincount(drawn, minlength=5)[:5].double() / len(drawn)
    assert int((probs[drawn] == 0).sum()) == 0
    assert torch.allclose(share, probs[:5].double(), atol=0.03), share
    top2 = choose_tokens(logits, dataclasses.replace(spec, top_k=2),
                         torch.Generator().manual_seed(5))
    assert set(top2.tolist()) == {0, 1}
    assert abs(float((top2 == 0).double().mean()) - 2 / 3) < 0.03


def test_a_uniform_at_the_rows_total_draws_its_last_possible_token(monkeypatch):
    """A uniform that rounds up to the row's cumulative total points past the last token;
    the draw then takes the last token of non-zero probability, never an excluded one."""
    from engine import decoding

    monkeypatch.setattr(decoding.torch, "rand", lambda shape, **kw: torch.ones(
        shape, dtype=kw.get("dtype")))
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert decoding._draw(probs, torch.Generator()).tolist() == [2, 4]
