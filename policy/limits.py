"""Server-wide limits that every request is checked against before it is queued.

Per-key scopes and quotas build on these. Must not import fastapi or engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policy.errors import LimitExceeded

# Checked with fullmatch: `$` alone would let a trailing newline through.
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Limits:
    max_lora_rank: int = 64
    max_samples_per_request: int = 16
    max_sample_tokens: int = 1024
    max_datums_per_request: int = 1024
    max_tokens_per_request: int = 262_144
    # LoRA learning rates are ~1e-5..1e-2; far larger ones only blow the weights up.
    max_learning_rate: float = 1.0

    def check_rank(self, rank: int) -> None:
        """The server's cap on a (valid, engine.values.LoraSpec) rank."""
        if rank > self.max_lora_rank:
            raise LimitExceeded(f"LoRA rank {rank} exceeds the maximum of {self.max_lora_rank}")

    def check_batch(self, datums: int, tokens: int) -> None:
        if datums > self.max_datums_per_request:
            raise LimitExceeded(
                f"{datums} datums exceed the limit of {self.max_datums_per_request} per request"
            )
        if tokens > self.max_tokens_per_request:
            raise LimitExceeded(
                f"{tokens} tokens exceed the limit of {self.max_tokens_per_request} per request"
            )

    def check_learning_rate(self, learning_rate: float) -> None:
        """The server's cap on a (valid, engine.values.AdamStep) learning rate."""
        if learning_rate > self.max_learning_rate:
            raise LimitExceeded(f"learning_rate {learning_rate} exceeds the limit of "
                                f"{self.max_learning_rate}")

    def check_sampling(self, num_samples: int, max_tokens: int) -> None:
        if num_samples > self.max_samples_per_request:
            raise LimitExceeded(f"num_samples {num_samples} exceeds the limit of "
                                f"{self.max_samples_per_request}")
        if max_tokens > self.max_sample_tokens:
            raise LimitExceeded(f"max_tokens {max_tokens} exceeds the limit of "
                                f"{self.max_sample_tokens}")


def check_checkpoint_name(name: str) -> str:
    """Names become the last segment of a tinker path and a directory on disk."""
    if not CHECKPOINT_NAME.fullmatch(name) or ".." in name:
        raise LimitExceeded(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '/' and no '..'"
        )
    return name
