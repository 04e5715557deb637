"""Answer scoring (the release gate's likelihood suites): the engine's shared-prefix path
gives the log-likelihoods of an independent full pass per pair, on the base model and on a
trained adapter, and runs the prefix the prompts share once per batch, not once per pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.errors import UserInputError
from engine.torch_backend import ANSWER_BATCH
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
