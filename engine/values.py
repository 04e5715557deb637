"""The validated value objects every layer shares: what a training datum, a sampling
request, an optimizer step and a loss call may be, and whether token ids fit a model.

The wire layer builds these from a request; policy, screening and the engine use them as
they are. A value object that exists is valid: each checks its own fields when it is
built (a `UserInputError` naming the field), so no later layer checks them again. Whether
ids fit a particular model (its vocabulary and context) needs that model's `ModelInfo`:
`check_data_fits` and `SampleSpec.check_fits` say so at the edge, and the engine keeps
its one guard on the same rule as its isolation invariant.

Must not import torch, the database, policy or the gateway.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import UserInputError

LOSS_FUNCTIONS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")
"""Built-in losses, as defined in the Tinker loss reference and docs (engine.losses says
which formula and source each follows). Nothing else is accepted."""

UNSUPPORTED_LOSSES: dict[str, str] = {
    "custom": "no user code runs on this server; use forward_backward_custom, which "
              "computes the loss in your process",
    "stable_reinforce": "its objective needs the stability information that Tinker's "
                        "samplers record (record_stability_info) and the datums' provenance "
                        "spans, and Tinker has not published it; this server records neither. "
                        "Use gspo, ppo or cispo for off-policy RL",
}
"""Losses the SDK names (tinker.types.LossFnType) that are refused, and why."""

LOSS_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),  # weights optional: missing means all ones
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
}
LOSS_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": (),
    "ppo": (),
    "cispo": (),
    "dro": (),
    # Which positions form the sequence ratio; missing means those with advantage != 0.
    "gspo": ("sequence_ratio_mask",),
}
LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    # The Tinker docs give no default for beta; 0.05 is their example value.
    "dro": {"beta": 0.05},
    # Server choice, as for ppo: the Tinker GSPO page writes the bounds as 1 - eps_low and
    # 1 + eps_high without stating defaults.
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
INT_INPUTS = frozenset({"target_tokens"})
TWO_D_INPUTS = frozenset({"target_tokens", "weights"})
"""Inputs that may be (N, K): K candidate targets per position with one weight each (e.g.
a teacher's top-k distribution for distillation); only cross_entropy accepts them."""
MAX_TARGET_CANDIDATES = 100
"""The most candidate targets (K) per position: the most top-k logprobs a sampler returns."""

# Stop sequences per sampling request, and the length of each (characters or, for token
# sequences, ids): each is matched against every generated token.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOPK_LOGPROBS = 100


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool)


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about a base model without loading it."""

    name: str
    arch: str
    vocab_size: int
    max_context: int
    tokenizer_dir: str
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


def check_ids_fit(ids: Iterable[int] | np.ndarray, info: ModelInfo, what: str) -> None:
    """Every id inside the model's vocabulary: the one rule the edge and the engine share
    (an id outside it would index past the embedding table)."""
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    outside = array[(array < 0) | (array >= info.vocab_size)]
    require(not outside.size, f"{what} holds token id {int(outside[0]) if outside.size else 0}, "
                              f"outside the vocabulary [0, {info.vocab_size}) of {info.name}")


def check_length_fits(length: int, info: ModelInfo, what: str) -> None:
    require(length <= info.max_context,
            f"{what} ({length} tokens) exceeds the context of {info.name} ({info.max_context})")


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


@dataclass(frozen=True)
class LoraSpec:
    """Shape of one adapter: an integer `rank` >= 1 (full fine-tuning is never offered;
    the model's hidden size bounds it too, which the engine checks), a seed in [0, 2**64)
    or None, and at least one kind of layer to train."""

    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def __post_init__(self) -> None:
        require(_is_int(self.rank) and self.rank >= 1,
                f"LoRA rank must be an integer, at least 1 (got {self.rank!r}); full-parameter "
                "training is not offered")
        require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
                f"LoRA seed must be an integer in [0, 2**64), got {self.seed!r}")
        flags = (self.train_mlp, self.train_attn, self.train_unembed)
        require(all(isinstance(flag, bool) for flag in flags),
                "train_mlp, train_attn and train_unembed must be true or false")
        require(any(flags), "at least one of train_mlp, train_attn, train_unembed must be true")

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


# ----------------------------------------------------------------------- optimizer step


@dataclass(frozen=True)
class AdamStep:
    """Hyper-parameters of one optim_step (they may change every step): finite numbers,
    none negative, eps > 0, betas below 1."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            require(_is_number(value) and math.isfinite(value),
                    f"adam_params.{name} must be a finite number, got {value!r}")
            require(value >= 0, f"adam_params.{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        require(self.eps > 0, f"adam_params.eps must be > 0, got {self.eps!r}")
        for name in ("beta1", "beta2"):
            require(getattr(self, name) < 1, f"adam_params.{name} must be < 1, got "
                                             f"{getattr(self, name)!r}")


# ------------------------------------------------------------------------ training datum


@dataclass(frozen=True, eq=False)
class TrainingDatum:
    """One sequence: `tokens` is the model input (N,) int64, `loss_inputs` maps names to
    arrays of shape (N,): target_tokens int64, the others (weights, logprobs, advantages,
    sequence_ratio_mask) finite float32. target_tokens and weights may instead be (N, K),
    1 <= K <= MAX_TARGET_CANDIDATES (K candidate targets per position, each with its
    weight); weights then have the shape of target_tokens. Built from integer and numeric
    arrays of those shapes."""

    tokens: np.ndarray
    loss_inputs: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        tokens = _id_array(self.tokens, "model_input")
        require(isinstance(self.loss_inputs, Mapping), "loss_fn_inputs must be a mapping")
        n = len(tokens)
        inputs = {}
        for name, value in self.loss_inputs.items():
            what = f"loss_fn_inputs[{name!r}]"
            two_d = name in TWO_D_INPUTS
            array = (_id_array(value, what, two_d) if name in INT_INPUTS
                     else _finite_array(value, what, two_d))
            require(len(array) == n, f"{what} has length {len(array)} but "
                                     f"model_input has {n} tokens (targets are next-token "
                                     "aligned, one per input)")
            inputs[name] = array
        targets, weights = inputs.get("target_tokens"), inputs.get("weights")
        if targets is not None and weights is not None:
            require(weights.shape == targets.shape,
                    f"loss_fn_inputs['weights'] has shape {list(weights.shape)} but "
                    f"loss_fn_inputs['target_tokens'] has {list(targets.shape)}; one weight per "
                    "target (for (N, K) targets, (N, K) weights)")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "loss_inputs", inputs)

    @property
    def candidates(self) -> int:
        """K, the candidate targets per position: 0 for 1-D targets."""
        targets = self.loss_inputs.get("target_tokens")
        return 0 if targets is None or targets.ndim == 1 else int(targets.shape[1])


def _shaped(value: Any, what: str, two_d: bool = False) -> np.ndarray:
    array = np.asarray(value)
    if two_d and array.ndim == 2:
        k = array.shape[1]
        require(1 <= k <= MAX_TARGET_CANDIDATES,
                f"{what} has shape {list(array.shape)}: 2-D targets need between 1 and "
                f"{MAX_TARGET_CANDIDATES} candidates (K) per position")
    else:
        require(array.ndim == 1, f"{what} must be 1-D"
                + (" or 2-D (N, K)" if two_d else "") + f", got shape {list(array.shape)}")
    require(array.size > 0, f"{what} is empty")
    return array


def _id_array(value: Any, what: str, two_d: bool = False) -> np.ndarray:
    array = _shaped(value, what, two_d)
    require(np.issubdtype(array.dtype, np.integer),
            f"{what} must hold integer token ids, got {array.dtype}")
    return array.astype(np.int64)


def _finite_array(value: Any, what: str, two_d: bool = False) -> np.ndarray:
    array = _shaped(value, what, two_d)
    require(np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer),
            f"{what} must hold numbers, got {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        array32 = array.astype(np.float32)
    bad = np.argwhere(~np.isfinite(array32))
    require(not bad.size, f"{what} holds a non-finite value at position "
                          f"{[int(i) for i in bad[0]] if bad.size else 0} "
                          "(NaN, Inf or beyond float32)")
    return array32


def check_data_fits(data: Sequence[TrainingDatum], info: ModelInfo) -> None:
    """Every datum's input and target ids in the model's vocabulary, every datum within
    its context."""
    for index, datum in enumerate(data):
        check_length_fits(len(datum.tokens), info, f"datum {index}")
        check_ids_fit(datum.tokens, info, f"datum {index}: model_input")
        targets = datum.loss_inputs.get("target_tokens")
        if targets is not None:
            check_ids_fit(targets, info, f"datum {index}: target_tokens")


# ----------------------------------------------------------------------------- losses


def check_loss_fn(loss_fn: str) -> str:
    require(loss_fn not in UNSUPPORTED_LOSSES,
            f"loss_fn {loss_fn!r} is not supported by this server: "
            f"{UNSUPPORTED_LOSSES.get(loss_fn, '')}")
    require(loss_fn in LOSS_FUNCTIONS,
            f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSS_FUNCTIONS)}")
    return loss_fn


def resolve_config(loss_fn: str, loss_config: Mapping[str, Any] | None) -> dict[str, float]:
    """The loss's defaults overridden by `loss_config`; refuses unknown keys and bad values."""
    defaults = LOSS_CONFIG_DEFAULTS[check_loss_fn(loss_fn)]
    given = dict(loss_config or {})
    unknown = sorted(set(given) - set(defaults))
    require(not unknown, f"loss_fn_config keys {unknown} are not accepted by {loss_fn!r} "
                         f"(allowed: {', '.join(sorted(defaults)) or 'none'})")
    config = {**defaults}
    for key, value in given.items():
        require(_is_number(value) and math.isfinite(value),
                f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        config[key] = float(value)
    require(config.get("beta", 0.0) >= 0.0, "loss_fn_config['beta'] weighs dro's penalty on "
            f"drifting from the sampler's logprobs and must be >= 0, got {config.get('beta')}")
    if "clip_low_threshold" in config:
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        require(0.0 <= low <= high, "loss_fn_config needs 0 <= clip_low_threshold <= "
                                    f"clip_high_threshold, got {low} and {high}")
    return config


def check_loss_inputs(data: Sequence[TrainingDatum], loss_fn: str) -> None:
    """At least one datum, each with the inputs `loss_fn` needs and none it does not use."""
    require(len(data) > 0, "forward_backward needs at least one datum")
    required, optional = LOSS_REQUIRED_INPUTS[loss_fn], LOSS_OPTIONAL_INPUTS[loss_fn]
    for index, datum in enumerate(data):
        missing = [k for k in required if k not in datum.loss_inputs]
        require(not missing, f"datum {index}: {loss_fn} needs loss_fn_inputs {missing}")
        unknown = sorted(set(datum.loss_inputs) - set(required) - set(optional))
        require(not unknown, f"datum {index}: loss_fn_inputs {unknown} are not used by "
                             f"{loss_fn}")
        require(not datum.candidates or loss_fn == "cross_entropy",
                f"datum {index}: loss_fn_inputs['target_tokens'] has shape "
                f"{list(datum.loss_inputs['target_tokens'].shape)}; 2-D (N, K) targets are "
                f"accepted by cross_entropy only, not by {loss_fn}")


# ------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SampleSpec:
    """One sampling request. `stop_token_ids=None` and `stop_strings=None` mean the model's
    end-of-sequence tokens stop generation; empty tuples for both mean nothing stops it."""

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

    def __post_init__(self) -> None:
        prompt = tuple(self.prompt) if isinstance(self.prompt, tuple | list) else ()
        require(bool(prompt), "the prompt must hold at least one token")
        require(all(_is_int(t) for t in prompt), "the prompt must hold integer token ids")
        object.__setattr__(self, "prompt", tuple(int(t) for t in prompt))
        self._check_counts()
        require(_is_number(self.temperature) and math.isfinite(self.temperature)
                and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature!r}")
        require(_is_number(self.top_p) and 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p!r}")
        require(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
                f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
                f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        self._check_stops()

    def _check_counts(self) -> None:
        require(_is_int(self.num_samples) and self.num_samples >= 1,
                f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        require(_is_int(self.max_tokens) and self.max_tokens >= 1,
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            k = getattr(self, name)
            require(_is_int(k) and 0 <= k <= MAX_TOPK_LOGPROBS,
                    f"{name} must be between 0 and {MAX_TOPK_LOGPROBS}, got {k!r}")

    def _check_stops(self) -> None:
        strings, ids = self.stop_strings, self.stop_token_ids
        count = len(strings or ()) + len(ids or ())
        require(count <= MAX_STOP_SEQUENCES, f"sampling_params.stop has {count} entries; at "
                f"most {MAX_STOP_SEQUENCES} stop sequences are accepted")
        require(all(isinstance(text, str) and text for text in strings or ()),
                "stop strings must be non-empty strings")
        longest = max((len(text) for text in strings or ()), default=0)
        require(longest <= MAX_STOP_LENGTH, f"a stop string of {longest} characters is too "
                                            f"long; each may have at most {MAX_STOP_LENGTH}")
        require(all(_is_int(t) for t in ids or ()), "stop token ids must be integers")

    def check_fits(self, info: ModelInfo) -> None:
        """The prompt and stop ids in the model's vocabulary; prompt + max_tokens within
        its context."""
        check_ids_fit(self.prompt, info, "the prompt")
        check_ids_fit(self.stop_token_ids or (), info, "sampling_params.stop")
        check_length_fits(len(self.prompt) + self.max_tokens, info,
                          f"the prompt + max_tokens ({self.max_tokens})")

    @property
    def scored_prompt_tokens(self) -> int:
        """Prompt tokens the request scores (their logprobs or top-k)."""
        return len(self.prompt) if self.prompt_logprobs or self.topk_prompt_logprobs else 0

    @property
    def metered_tokens(self) -> int:
        """What the request may cost in sampled tokens: every token it may generate plus
        the prompt tokens it scores (prompt scoring is metered like generation)."""
        return self.num_samples * self.max_tokens + self.scored_prompt_tokens
