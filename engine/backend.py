"""The compute contract between the worker and a model runtime.

Owns the result dataclasses a backend returns and the abstract `Backend` class; the
requests it takes are the validated value objects of engine.values. One Backend instance
holds one base model in memory and any number of LoRA adapters on it, one per training run
(plus read-only sampler adapters).

Must not import torch at module level (the API process imports these types), must not
know about HTTP, the database or policy.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserInputError
from engine.values import AdamStep, LoraSpec, ModelInfo, SampleSpec, TrainingDatum

SCORE_BATCH = 16  # (prompt, answer) pairs per forward pass when scoring reference answers
GREEDY_ROWS = 32  # greedy replies decoded at once (generate_greedy)


@dataclass
class ForwardBackwardResult:
    """Per-datum outputs (`logprobs`, `elementwise_loss`, float32 arrays of shape (N,))
    and metrics whose keys are all `name:reduction`."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainingPass:
    """One forward_backward job: an adapter (None: the bare base, forward only), its
    datums, the loss and its config."""

    adapter_id: str | None
    data: list[TrainingDatum]
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool


@dataclass
class SampledSequence:
    """`tokens` includes the stop token when a stop token ended generation; `stopped` is
    True for a stop token/string/EOS, False when max_tokens was reached. `logprobs` are
    log-probabilities of each generated token under the unmodified model distribution
    (temperature 1, no top-k/top-p), so they match training-time target logprobs."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool
    topk: list[list[tuple[int, float]]] | None = None


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    # One entry per prompt token; entry 0 is None (no context).
    prompt_logprobs: list[float | None] | None = None
    # One row per prompt token; row 0 is None. Each row: up to k (token_id, logprob) pairs.
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


class SamplingBatch(abc.ABC):
    """Sampling requests decoded together: `add` them (each is checked then: a
    UserInputError leaves the batch as it was), then `step` until `empty`; each step
    returns the requests that finished with their results. Requests added between steps
    join the running ones when `can_join`, else once those have finished."""

    @abc.abstractmethod
    def add(self, key: Hashable, adapter_id: str | None, spec: SampleSpec) -> None: ...

    @abc.abstractmethod
    def step(self) -> list[tuple[Hashable, SampleResult]]: ...

    @property
    @abc.abstractmethod
    def rows(self) -> int:
        """Samples of the requests in the batch (the rows they decode in)."""

    @property
    @abc.abstractmethod
    def empty(self) -> bool: ...

    @property
    def can_join(self) -> bool:
        return True

    def run(self) -> dict[Hashable, SampleResult]:
        """Step until every request added so far has finished; results by key."""
        results: dict[Hashable, SampleResult] = {}
        while not self.empty:
            results.update(self.step())
        return results


class _OneAtATime(SamplingBatch):
    """The default: each request is sampled alone when it is added."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._done: list[tuple[Hashable, SampleResult, int]] = []

    def add(self, key: Hashable, adapter_id: str | None, spec: SampleSpec) -> None:
        self._done.append((key, self.backend.sample(adapter_id, spec), spec.num_samples))

    def step(self) -> list[tuple[Hashable, SampleResult]]:
        if not self._done:
            return []
        key, result, _ = self._done.pop(0)
        return [(key, result)]

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self._done)

    @property
    def empty(self) -> bool:
        return not self._done


class Backend(abc.ABC):
    """One base model in memory, many LoRA adapters on it.

    Every method either completes or raises without changing state: a UserInputError
    (including NonFiniteError) leaves the adapter's weights, accumulated gradients and
    optimizer state exactly as they were, and never touches other adapters or the base.
    """

    info: ModelInfo

    @abc.abstractmethod
    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> None:
        """Add a fresh trainable adapter with its own AdamW state and zero gradients."""

    @abc.abstractmethod
    def has_adapter(self, adapter_id: str) -> bool: ...

    @abc.abstractmethod
    def drop_adapter(self, adapter_id: str) -> None:
        """Free the adapter; a no-op if it is not loaded."""

    @abc.abstractmethod
    def forward_backward(
        self,
        adapter_id: str | None,
        data: list[TrainingDatum],
        loss_fn: str,
        loss_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        """Run the loss; unless forward_only, add the gradients to the adapter's
        accumulator. adapter_id None means the bare base model and requires forward_only."""

    def forward_backward_many(
        self, jobs: Sequence[TrainingPass]
    ) -> list[ForwardBackwardResult | UserInputError]:
        """forward_backward of several jobs (of different runs), in order; a job that fails
        gives its UserInputError in its place and the others go on."""
        results: list[ForwardBackwardResult | UserInputError] = []
        for job in jobs:
            try:
                results.append(self.forward_backward(job.adapter_id, job.data, job.loss_fn,
                                                     job.loss_config, job.forward_only))
            except UserInputError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def optim_step(self, adapter_id: str, step: AdamStep) -> dict[str, float]:
        """Apply the accumulated gradients with AdamW (after global-norm clipping when
        grad_clip_norm > 0), then zero the accumulator. Returns `name:reduction` metrics."""

    @abc.abstractmethod
    def save_adapter(self, adapter_id: str, directory: Path, with_optimizer: bool) -> int:
        """Write adapter tensors (and optionally optimizer state) as safetensors plus a
        small JSON manifest into `directory`. Never writes base weights. Returns bytes."""

    @abc.abstractmethod
    def load_adapter(self, adapter_id: str, directory: Path, with_optimizer: bool) -> LoraSpec:
        """Create (or replace) adapter `adapter_id` from a directory written by
        save_adapter. Without optimizer the AdamW state starts fresh."""

    # True when save_adapter/load_adapter with the optimizer capture an adapter's whole
    # trained state, and forward_backward/optim_step run again on it give the same numbers:
    # the worker then keeps every run recoverable from disk (engine.run_state).
    keeps_durable_state = False

    # True when forward_backward_many runs jobs of different runs in one pass: the worker
    # then hands it the next job of several runs at once.
    batch_across_runs = False

    @abc.abstractmethod
    def sample(self, adapter_id: str | None, spec: SampleSpec) -> SampleResult:
        """Generate with a KV cache. adapter_id None samples the bare base model.
        The same seed and spec give the same tokens."""

    def batch_decoder(self) -> SamplingBatch:
        """Many sampling requests decoded together (the default samples each alone)."""
        return _OneAtATime(self)

    # -- evaluation helpers: defaults built on the calls above; backends may do better --

    def score_continuations(self, adapter_id: str | None, prompt: Sequence[int],
                            continuations: Sequence[Sequence[int]]) -> list[float]:
        """Sum of log P(continuation | prompt) for each continuation (none may be empty)."""
        data = []
        for continuation in continuations:
            tokens = np.asarray([*prompt, *continuation], dtype=np.int64)
            weights = np.zeros(len(tokens) - 1, dtype=np.float32)
            weights[len(prompt) - 1:] = 1.0
            data.append(TrainingDatum(tokens=tokens[:-1], loss_inputs={
                "target_tokens": tokens[1:], "weights": weights}))
        result = self.forward_backward(adapter_id, data, "cross_entropy", {}, True)
        return [float(np.sum(out["logprobs"][len(prompt) - 1:])) for out in result.outputs]

    def score_continuation_sets(
        self, adapter_id: str | None,
        sets: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    ) -> list[list[float]]:
        """score_continuations for each (prompt, continuations) set, in order."""
        return [self.score_continuations(adapter_id, prompt, continuations)
                for prompt, continuations in sets]

    def score_answers(self, adapter_id: str | None,
                      pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """Sum of log P(answer | prompt) for many (prompt, answer) pairs with different
        prompts (neither may be empty), scored forward-only in batches."""
        data = []
        for prompt, answer in pairs:
            tokens = np.asarray([*prompt, *answer], dtype=np.int64)
            weights = np.zeros(len(tokens) - 1, dtype=np.float32)
            weights[len(prompt) - 1:] = 1.0
            data.append(TrainingDatum(tokens=tokens[:-1], loss_inputs={
                "target_tokens": tokens[1:], "weights": weights}))
        # Similar lengths batch together (less padding); scores return in input order.
        order = sorted(range(len(data)), key=lambda i: len(data[i].tokens))
        scores = [0.0] * len(data)
        for start in range(0, len(order), SCORE_BATCH):
            batch = order[start:start + SCORE_BATCH]
            result = self.forward_backward(adapter_id, [data[i] for i in batch],
                                           "cross_entropy", {}, True)
            for i, out in zip(batch, result.outputs, strict=True):
                scores[i] = float(np.sum(out["logprobs"][len(pairs[i][0]) - 1:]))
        return scores

    def generate_greedy(self, adapter_id: str | None, prompts: Sequence[Sequence[int]],
                        max_tokens: int) -> list[list[int]]:
        """Greedy replies (up to max_tokens, ending at the model's EOS) to many prompts,
        decoded together by `batch_decoder()`: at most GREEDY_ROWS at once, the next prompt
        joining as soon as one finishes (continuous batching)."""
        if any(not p for p in prompts) or max_tokens < 1:
            raise UserInputError("prompts must be non-empty and max_tokens at least 1")
        decoder = self.batch_decoder()
        waiting = list(enumerate(prompts))
        replies: dict[Hashable, list[int]] = {}
        while waiting or not decoder.empty:
            while waiting and decoder.rows < GREEDY_ROWS and decoder.can_join:
                index, prompt = waiting.pop(0)
                decoder.add(index, adapter_id, SampleSpec(prompt=tuple(prompt),
                                                          max_tokens=max_tokens,
                                                          temperature=0.0))
            replies.update((key, result.sequences[0].tokens) for key, result in decoder.step())
        return [replies[i] for i in range(len(prompts))]
