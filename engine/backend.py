"""The compute contract between the worker and a model runtime.

Owns the request/response dataclasses the worker passes to a backend and the abstract
`Backend` class. One Backend instance holds one base model in memory and any number of
LoRA adapters on it, one per training run (plus read-only sampler adapters).

Must not import torch at module level (the API process imports these types), must not
know about HTTP, the database or policy.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LOSS_FUNCTIONS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
"""Built-in losses, as defined in the Tinker loss reference. Nothing else is accepted."""

LOSS_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),  # weights optional: missing means all ones
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
LOSS_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": (),
    "ppo": (),
    "cispo": (),
    "dro": (),
}
LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    # The Tinker docs give no default for beta; 0.05 is their example value.
    "dro": {"beta": 0.05},
}


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
SCORE_BATCH = 16  # (prompt, answer) pairs per forward pass when scoring reference answers


@dataclass(frozen=True)
class LoraSpec:
    """Shape of one adapter. `rank` >= 1 (full fine-tuning is never offered)."""

    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def target_modules(self) -> list[str]:
        """The linear layers the adapter's LoRA pairs sit on (PEFT target_modules)."""
        return [*(ATTN_MODULES if self.train_attn else ()),
                *(MLP_MODULES if self.train_mlp else ()),
                *(UNEMBED_MODULES if self.train_unembed else ())]

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "seed": self.seed,
            "train_mlp": self.train_mlp,
            "train_attn": self.train_attn,
            "train_unembed": self.train_unembed,
        }


@dataclass(frozen=True)
class AdamStep:
    """Hyper-parameters of one optim_step (they may change every step)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class TrainingDatum:
    """One sequence: `tokens` is the model input (N,), `loss_inputs` maps names to arrays
    of shape (N,): target_tokens int64, weights/logprobs/advantages float32."""

    tokens: np.ndarray
    loss_inputs: dict[str, np.ndarray]


@dataclass
class ForwardBackwardResult:
    """Per-datum outputs (`logprobs`, `elementwise_loss`, float32 arrays of shape (N,))
    and metrics whose keys are all `name:reduction`."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class SampleSpec:
    """One sampling request. `stop_token_ids=None` and `stop_strings=None` mean the model's
    end-of-sequence tokens stop generation; empty lists for both mean nothing stops it."""

    prompt: tuple[int, ...]
    num_samples: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0

    @property
    def scored_prompt_tokens(self) -> int:
        """Prompt tokens the request scores (their logprobs or top-k)."""
        return len(self.prompt) if self.prompt_logprobs or self.topk_prompt_logprobs else 0

    @property
    def metered_tokens(self) -> int:
        """What the request may cost in sampled tokens: every token it may generate plus
        the prompt tokens it scores (prompt scoring is metered like generation)."""
        return self.num_samples * self.max_tokens + self.scored_prompt_tokens


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


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about a base model without loading it."""

    name: str
    arch: str
    vocab_size: int
    max_context: int
    tokenizer_dir: str
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


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

    @abc.abstractmethod
    def sample(self, adapter_id: str | None, spec: SampleSpec) -> SampleResult:
        """Generate with a KV cache. adapter_id None samples the bare base model.
        The same seed and spec give the same tokens."""

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
        """Greedy replies (up to max_tokens, ending at the model's EOS) to many prompts."""
        return [self.sample(adapter_id, SampleSpec(prompt=tuple(p), max_tokens=max_tokens,
                                                   temperature=0.0)).sequences[0].tokens
                for p in prompts]
