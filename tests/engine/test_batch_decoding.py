"""Sampling requests decoded together (engine.decoding.BatchDecoder): every request of a
mixed batch — different adapters and the bare base, prompts of different lengths, its own
settings, seed and stop rules, prompt logprobs — gets what it would get alone; requests
join a running batch between steps and leave it as they finish; a bad request is refused
when it is added and leaves the batch as it was."""

from __future__ import annotations

import pytest

from engine.errors import UnknownAdapterError, UserInputError
from engine.values import SampleSpec

from .conftest import train_step

NO_STOP: dict = {"stop_token_ids": (), "stop_strings": ()}


def _trained(backend, new_adapter, seed: int) -> str:
    adapter = new_adapter(rank=4, seed=seed)
    train_step(backend, adapter, seed=seed, lr=0.1)
    return adapter


def _requests(first: str, second: str) -> dict[str, tuple[str | None, SampleSpec]]:
    return {
        "base-greedy": (None, SampleSpec(prompt=(1, 40, 41, 42, 43), num_samples=2,
                                         max_tokens=9, temperature=0.0, **NO_STOP)),
        "first-seeded": (first, SampleSpec(prompt=(1, 50, 51), num_samples=3, max_tokens=7,
                                           seed=11, topk_sample_logprobs=3, **NO_STOP)),
        "second-top-p": (second, SampleSpec(prompt=(1, 60, 61, 62, 63, 64, 65, 66),
                                            max_tokens=5, seed=5, top_p=0.8, top_k=20,
                                            **NO_STOP)),
        "first-same-prompt": (first, SampleSpec(prompt=(1, 50, 51), max_tokens=4,
                                                temperature=0.0, **NO_STOP)),
        "base-prompt-scored": (None, SampleSpec(prompt=(1, 70, 71, 72), max_tokens=3,
                                                seed=2, prompt_logprobs=True,
                                                topk_prompt_logprobs=2, **NO_STOP)),
        "second-stops": (second, SampleSpec(prompt=(1, 80), max_tokens=12, seed=9,
                                            num_samples=2, stop_token_ids=(2, 3, 4, 5))),
    }


def _assert_same(batched, alone) -> None:
    assert len(batched.sequences) == len(alone.sequences)
    for got, want in zip(batched.sequences, alone.sequences, strict=True):
        assert got.tokens == want.tokens and got.stopped == want.stopped
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        if want.topk is None:
            assert got.topk is None
        else:
            for row, ref in zip(got.topk, want.topk, strict=True):
                assert [t for t, _ in row] == [t for t, _ in ref]
    assert (batched.prompt_logprobs is None) == (alone.prompt_logprobs is None)
    if alone.prompt_logprobs is not None:
        assert batched.prompt_logprobs[0] is None
        assert batched.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=1e-4)
        assert len(batched.topk_prompt_logprobs) == len(alone.topk_prompt_logprobs)


def test_a_mixed_batch_gives_every_request_what_it_gets_alone(backend, new_adapter):
    requests = _requests(_trained(backend, new_adapter, 1), _trained(backend, new_adapter, 2))
    decoder = backend.batch_decoder()
    for key, (adapter, spec) in requests.items():
        decoder.add(key, adapter, spec)
    assert decoder.rows == 2 + 3 + 1 + 1 + 1 + 2
    results = decoder.run()
    assert decoder.empty and set(results) == set(requests)
    for key, (adapter, spec) in requests.items():
        _assert_same(results[key], backend.sample(adapter, spec))
    # The adapters matter: the trained ones decode differently from the base.
    assert results["first-same-prompt"].sequences[0].tokens != backend.sample(
        None, requests["first-same-prompt"][1]).sequences[0].tokens


def test_requests_join_a_running_batch_and_leave_it_as_they_finish(backend, new_adapter):
    adapter = _trained(backend, new_adapter, 3)
    long = SampleSpec(prompt=(1, 40, 41), max_tokens=10, seed=1, num_samples=2, **NO_STOP)
    longer_prompt = SampleSpec(prompt=tuple(range(1, 20)), max_tokens=3, temperature=0.0,
                               **NO_STOP)
    shorter_prompt = SampleSpec(prompt=(1, 90), max_tokens=4, seed=4, **NO_STOP)
    decoder = backend.batch_decoder()
    decoder.add("long", None, long)
    finished: dict[str, int] = {}
    results = {}
    for step in range(1, 40):
        if step == 3:  # the live cache is shorter than this prompt: the batch is padded
            decoder.add("longer-prompt", adapter, longer_prompt)
        if step == 4:  # ... and longer than this one: the newcomer is padded
            decoder.add("shorter-prompt", None, shorter_prompt)
        for key, result in decoder.step():
            finished[key], results[key] = step, result
        if decoder.empty:
            break
    assert finished == {"longer-prompt": 5, "shorter-prompt": 7, "long": 10}
    _assert_same(results["long"], backend.sample(None, long))
    _assert_same(results["longer-prompt"], backend.sample(adapter, longer_prompt))
    _assert_same(results["shorter-prompt"], backend.sample(None, shorter_prompt))


@pytest.mark.parametrize("bad", [
    (None, SampleSpec(prompt=(1, 10**9), max_tokens=2), UserInputError),
    ("no-such-adapter", SampleSpec(prompt=(1, 2), max_tokens=2), UnknownAdapterError),
])
def test_a_bad_request_is_refused_when_added_and_the_batch_goes_on(backend, bad):
    good = SampleSpec(prompt=(1, 40, 41), max_tokens=5, temperature=0.0, **NO_STOP)
    decoder = backend.batch_decoder()
    decoder.add("good", None, good)
    decoder.step()
    adapter, spec, error = bad
    with pytest.raises(error):
        decoder.add("bad", adapter, spec)
    results = decoder.run()
    assert set(results) == {"good"}
    _assert_same(results["good"], backend.sample(None, good))


def test_greedy_replies_decode_together_and_equal_plain_greedy_decoding(backend, new_adapter,
                                                                       monkeypatch):
    """The release gate's generation: more prompts than fit at once (the rest join as rows
    finish), of different lengths, each reply what Hugging Face's own greedy `generate`
    gives for that prompt alone, ending at EOS."""
    import torch

    import engine.backend

    monkeypatch.setattr(engine.backend, "GREEDY_ROWS", 3)
    adapter = _trained(backend, new_adapter, 4)
    prompts = [[1, *range(40, 40 + n)] for n in (1, 6, 3, 9, 2, 4, 7)]
    rows_when_added: list[int] = []
    make_decoder = backend.batch_decoder

    def recording_decoder():
        decoder = make_decoder()
        add = decoder.add

        def recorded_add(*args):
            rows_when_added.append(decoder.rows)
            add(*args)
        decoder.add = recorded_add
        return decoder

    monkeypatch.setattr(backend, "batch_decoder", recording_decoder)
    replies = backend.generate_greedy(adapter, prompts, 8)
    assert len(rows_when_added) == 7 and max(rows_when_added) <= 2
    assert any(rows_when_added[i] > 0 for i in range(3, 7))  # joined a running batch
    monkeypatch.undo()
    eos = list(backend.info.eos_token_ids)
    with torch.inference_mode(), backend._activate(adapter) as model:
        for prompt, reply in zip(prompts, replies, strict=True):
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8,
                                 do_sample=False, eos_token_id=eos or None,
                                 pad_token_id=eos[0] if eos else 0)[0, len(prompt):].tolist()
            want = out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]
            assert reply == want
    assert replies != backend.generate_greedy(None, prompts, 8)
    with pytest.raises(UserInputError, match="non-empty"):
        backend.generate_greedy(None, [[1, 2], []], 4)
