"""Per-key scopes: what a key may use (base models, LoRA rank, losses, top-k logprobs
from any sampler), its quotas (tokens per day, concurrent runs, stored checkpoints, release
evaluations per day) and its default lifetime.

Defaults come from a reviewed TOML file (`default_scopes.toml`, or the operator's own);
a key stores only the scopes an admin overrode, and the effective scopes are resolved on
every request, so a changed default reaches every key that did not override it.

Quotas hold per person, not per key: a person's limit for each quota is the smallest that
any of their usable keys has (`person_limits`), so another key never adds budget. The
other scopes are the calling key's own. Quota accounting itself is in policy.quotas. Must
not import fastapi or engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.errors import LimitExceeded, PolicyError

DEFAULT_SCOPES_PATH = Path(__file__).with_name("default_scopes.toml")


class ScopeDenied(PolicyError):
    """The key's scopes do not cover this request (HTTP 403)."""


@dataclass(frozen=True)
class Scopes:
    base_models: tuple[str, ...]
    max_lora_rank: int
    losses: tuple[str, ...]
    max_base_topk_logprobs: int
    training_tokens_per_day: int
    sampled_tokens_per_day: int
    concurrent_training_runs: int
    checkpoints_stored: int
    expires_in_days: int | None
    # Release evaluations (requests, publishes, exports) queued per UTC day. Has a default
    # so that operators' scope files written before it existed still load.
    release_evaluations_per_day: int = 20
    # The defaults these scopes were resolved from (`effective`), so that a person's other
    # keys resolve the same way (`person_limits`). Not a scope.
    resolved_from: Scopes | None = dataclasses.field(default=None, compare=False,
                                                     repr=False)

    @property
    def defaults(self) -> Scopes:
        """The defaults these scopes were resolved from (themselves, for the defaults)."""
        return self.resolved_from or self

    def with_overrides(self, overrides: dict[str, Any]) -> Scopes:
        return dataclasses.replace(self, **_coerce(overrides, self))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop(NOT_A_SCOPE)
        out["base_models"], out["losses"] = list(self.base_models), list(self.losses)
        return out

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # --- checks on what a request asks for -------------------------------------------

    def check_base_model(self, name: str) -> None:
        if "*" not in self.base_models and name not in self.base_models:
            raise ScopeDenied(f"this API key may not use base model {name!r}; it may use: "
                              f"{', '.join(self.base_models) or 'none'}")

    def check_rank(self, rank: int) -> None:
        if rank > self.max_lora_rank:
            raise ScopeDenied(f"LoRA rank {rank} exceeds this API key's maximum of "
                              f"{self.max_lora_rank}")

    def check_loss(self, loss_fn: str) -> None:
        if loss_fn not in self.losses:
            raise ScopeDenied(f"this API key may not use the loss {loss_fn!r}; it may use: "
                              f"{', '.join(self.losses) or 'none'}")

    def check_topk_logprobs(self, topk_prompt: int, topk_sample: int) -> None:
        """Top-k logprobs (of the prompt or of sampled tokens) are capped for every
        sampler: an adapter's distribution is the base model's plus a low-rank change (an
        untrained one is the base exactly), so capping only the bare base would leave the
        distillation channel open through any adapter."""
        asked = max(topk_prompt, topk_sample)
        if asked > self.max_base_topk_logprobs:
            raise ScopeDenied(
                f"top-k logprobs of {asked} exceed this API key's maximum of "
                f"{self.max_base_topk_logprobs} (scope max_base_topk_logprobs, for every "
                "sampler: the base model or any adapter); ask for fewer")


NOT_A_SCOPE = "resolved_from"
FIELD_TYPES: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Scopes)  # type: ignore[misc]
                                if f.name != NOT_A_SCOPE}
LIST_FIELDS = ("base_models", "losses")
REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(Scopes)
                        if f.default is dataclasses.MISSING)
# The quotas, held per person (policy.quotas): the tightest of the person's usable keys.
QUOTA_FIELDS = ("training_tokens_per_day", "sampled_tokens_per_day",
                "concurrent_training_runs", "checkpoints_stored", "release_evaluations_per_day")


def _coerce(values: dict[str, Any], defaults: Scopes | None) -> dict[str, Any]:
    """Validate scope values (from the file or an admin's overrides); say what is wrong."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in FIELD_TYPES:
            raise LimitExceeded(f"unknown scope {name!r}; known scopes: "
                                f"{', '.join(FIELD_TYPES)}")
        if name in LIST_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise LimitExceeded(f"scope {name} must be a list of names")
            if name == "losses" and defaults is not None:
                unknown = sorted(set(value) - set(defaults.losses))
                if unknown:
                    raise LimitExceeded(f"scope losses names unknown losses {unknown}; "
                                        f"choose from {', '.join(defaults.losses)}")
            out[name] = tuple(value)
        elif name == "expires_in_days" and value is None:
            out[name] = None
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LimitExceeded(f"scope {name} must be a whole number >= 0")
            if name == "expires_in_days" and value < 1:
                raise LimitExceeded("scope expires_in_days must be at least 1 (or null)")
            out[name] = value
    return out


def check_overrides(overrides: object, defaults: Scopes) -> dict[str, Any]:
    """An admin's scope overrides, validated; returned as stored (JSON-ready)."""
    if not isinstance(overrides, dict):
        raise LimitExceeded("scopes must be a JSON object")
    _coerce(overrides, defaults)
    return dict(overrides)


def load_defaults(path: Path | None = None) -> Scopes:
    """The default scopes from a TOML file; every scope must be present."""
    path = path or DEFAULT_SCOPES_PATH
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LimitExceeded(f"scopes file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LimitExceeded(f"scopes file {path} is not valid TOML: {exc}") from exc
    missing = sorted(set(REQUIRED_FIELDS) - set(raw))
    if missing:
        raise LimitExceeded(f"scopes file {path} lacks: {', '.join(missing)}")
    return Scopes(**_coerce(raw, None))


def effective(defaults: Scopes, stored: str | None) -> Scopes:
    """A key's scopes: the defaults with its stored overrides applied."""
    overrides = json.loads(stored) if stored else {}
    if not overrides:
        return defaults
    return dataclasses.replace(defaults.with_overrides(overrides), resolved_from=defaults)


def person_limits(own: Scopes, others: Iterable[str | None]) -> Scopes:
    """The scopes a request is held to: the calling key's `own` scopes, with each quota the
    smallest among it and the person's other usable keys (their stored overrides, resolved
    against the same defaults). A person's keys share one budget, and a tighter key is the
    person's limit."""
    keys = [own, *(effective(own.defaults, stored) for stored in others)]
    return dataclasses.replace(own, **{name: min(getattr(k, name) for k in keys)
                                       for name in QUOTA_FIELDS})
