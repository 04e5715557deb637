"""Scoring for the release gate's likelihood suites: reference answers (one per prompt) and
continuation sets (several per prompt, many prompts batched, left-padded) give the
log-likelihoods of an independent full pass per sequence, on the base model and on a
trained adapter, and run the prefix the prompts share once per batch, not once per row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.errors import UserInputError
from engine.torch_backend import ANSWER_BATCH, SET_ROWS
from tests.engine.conftest import random_tokens, train_step

PREFIX = [5, 9, 14, 3, 22, 7]  # a chat template's system turn, say


def _pairs(vocab: int, shared: list[int], n: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(3)
    pairs = [([*shared, 11], [int(rng.integers(3, vocab))])]  # the shortest possible pair
    for k in range(n - 1):
        prompt = [*shared, *random_tokens(rng, 1 + k % 7, vocab).tolist()]
        pairs.append((prompt, random_tokens(rng, 1 + (5 * k) % 9, vocab).tolist()))
    return pairs


def _reference_scores(reference, pairs, tensors, rank) -> list[float]:
    scores = []
    with reference.lora(tensors, rank=rank):
        for prompt, answer in pairs:
            tokens = np.asarray([*prompt, *answer])
            logp = reference.target_logprobs(tokens[:-1], tokens[1:])
            scores.append(float(logp[len(prompt) - 1:].sum()))
    return scores


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("shared", [PREFIX, []], ids=["shared-prefix", "no-prefix"])
def test_scores_equal_an_independent_full_pass_per_pair(backend, new_adapter, reference,
                                                         trained, shared):
    pairs = _pairs(backend.vocab_size, shared, 2 * ANSWER_BATCH + 3)
    if not shared:  # prompts that share nothing, not even their first token
        pairs[1] = ([pairs[0][0][0] + 1, *pairs[1][0][1:]], pairs[1][1])
    adapter = new_adapter(rank=4) if trained else None
    if adapter is not None:
        train_step(backend, adapter)
    tensors = backend.adapter_tensors(adapter) if adapter is not None else None
    expected = _reference_scores(reference, pairs, tensors, rank=4)
    np.testing.assert_allclose(backend.score_answers(adapter, pairs), expected,
                               rtol=1e-5, atol=1e-4)


def test_the_shared_prefix_runs_once_per_batch(backend):
    pairs = _pairs(backend.vocab_size, PREFIX, 3 * ANSWER_BATCH)
    rows_with_prefix = []

    def count(module, inputs, output):
        ids = inputs[0]
        rows_with_prefix.append(sum(row[:len(PREFIX)].tolist() == PREFIX for row in ids))

    handle = backend._base.get_input_embeddings().register_forward_hook(count)
    try:
        backend.score_answers(None, pairs)
    finally:
        handle.remove()
    assert sum(rows_with_prefix) == math.ceil(len(pairs) / ANSWER_BATCH)


@pytest.mark.parametrize("pair", [([], [4]), ([4], [])], ids=["empty-prompt", "empty-answer"])
def test_an_empty_prompt_or_answer_is_a_user_error_naming_the_pair(backend, pair):
    with pytest.raises(UserInputError, match="scored pair 1"):
        backend.score_answers(None, [([4, 5], [6]), pair])


def test_scoring_changes_nothing_in_the_model(backend):
    before = [p.detach().clone() for p in backend._base.parameters()]
    backend.score_answers(None, _pairs(backend.vocab_size, PREFIX, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, backend._base.parameters(),
                                                  strict=True))


def _sets(vocab: int, shared: list[int], n: int) -> list[tuple[list[int], list[list[int]]]]:
    """Prompts of different lengths, each with continuations of lengths 1 to 5; one set
    holds more continuations than a batch has rows."""
    rng = np.random.default_rng(5)
    sets = []
    for k in range(n):
        prompt = [*shared, *random_tokens(rng, 1 + (3 * k) % 8, vocab).tolist()]
        count = SET_ROWS + 3 if k == 2 else 1 + k % 5
        sets.append((prompt, [random_tokens(rng, 1 + (j + k) % 5, vocab).tolist()
                              for j in range(count)]))
    return sets


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("shared", [PREFIX, []], ids=["shared-prefix", "no-prefix"])
def test_continuation_sets_equal_an_independent_full_pass_per_sequence(
        backend, new_adapter, reference, trained, shared):
    sets = _sets(backend.vocab_size, shared, 14)
    if not shared:
        sets[1] = ([sets[0][0][0] + 1, *sets[1][0][1:]], sets[1][1])
    adapter = new_adapter(rank=4) if trained else None
    if adapter is not None:
        train_step(backend, adapter)
    tensors = backend.adapter_tensors(adapter) if adapter is not None else None
    flat = [(prompt, cont) for prompt, conts in sets for cont in conts]
    expected = iter(_reference_scores(reference, flat, tensors, rank=4))
    got = backend.score_continuation_sets(adapter, sets)
    assert [len(row) for row in got] == [len(conts) for _, conts in sets]
    np.testing.assert_allclose([x for row in got for x in row], list(expected),
                               rtol=1e-5, atol=1e-4)
    single = backend.score_continuations(adapter, *sets[3])
    np.testing.assert_allclose(single, got[3], rtol=1e-5, atol=1e-5)


def test_continuation_sets_run_the_shared_prefix_once_per_batch(backend):
    sets = [(prompt, conts) for prompt, conts in _sets(backend.vocab_size, PREFIX, 12)]
    rows_with_prefix = []

    def count(module, inputs, output):
        rows_with_prefix.append(sum(row[:len(PREFIX)].tolist() == PREFIX for row in inputs[0]))

    handle = backend._base.get_input_embeddings().register_forward_hook(count)
    try:
        backend.score_continuation_sets(None, sets)
    finally:
        handle.remove()
    # one prefix row per batch, and fewer batches than prompts
    assert 0 < sum(rows_with_prefix) < len(sets)


@pytest.mark.parametrize("bad", [([], [[4]]), ([4], []), ([4], [[5], []])],
                         ids=["empty-prompt", "no-continuations", "empty-continuation"])
def test_an_empty_set_part_is_a_user_error_naming_the_set(backend, bad):
    with pytest.raises(UserInputError, match="scored set 1"):
        backend.score_continuation_sets(None, [([4, 5], [[6]]), bad])
