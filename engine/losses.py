"""The built-in Tinker losses as pure per-token torch functions.

Owns the arithmetic of `cross_entropy`, `importance_sampling`, `ppo`, `cispo` and `dro` exactly as
in the Tinker loss reference (§4), and of `gspo` as on Tinker's GSPO page (see `gspo`): each
takes the trained model's target log-probabilities (one datum's (N,), or (N, K) for 2-D
cross-entropy targets; a leading probe axis is allowed), that datum's input tensors and the loss
config, and returns the per-token loss of the same shape. The scalar loss is the plain sum over
tokens (and candidates) and datums.
`trained_positions` derives from these same functions which target positions a datum can train,
and in which direction, for screening: no loss term can train text that screening does not see.

Must not touch models, adapters or optimizers, and must not average (clients fold any
normalisation into weights or advantages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from engine.errors import UserInputError
from engine.values import LOSS_CONFIG_DEFAULTS, LOSS_FUNCTIONS

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float]
LossFn = Callable[[torch.Tensor, Inputs, Config], torch.Tensor]


def cross_entropy(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """−w·logp. Missing `weights` means all ones (documented server choice).

    With 2-D targets (N, K) — K candidate tokens per position, e.g. a teacher's top-k for
    distillation — `logp` and `weights` are (N, K) and the loss is −w_ik·log p(t_ik) per
    candidate, so position i contributes −Σ_k w_ik·log p(t_ik): the cross-entropy against
    the weighted candidate distribution (tinker-losses.md §1, SDK `service_client.py:719-721`;
    the tinker-cookbook 0.5.8 `distillation/sdft.py` and `train_off_policy.py` build these
    datums and sum this way). With K = 1 and weight 1 this is the 1-D loss."""
    weights = inputs.get("weights")
    if weights is None:
        return -logp
    return -weights * logp


def importance_sampling(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """−r·A with r = exp(logp − q)."""
    ratio = torch.exp(logp - inputs["logprobs"])
    return -ratio * inputs["advantages"]


def ppo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """−min(r·A, clip(r, lo, hi)·A), token-wise."""
    advantages = inputs["advantages"]
    ratio = torch.exp(logp - inputs["logprobs"])
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """−sg(clip(r, lo, hi))·logp·A: the clipped ratio is a constant coefficient."""
    ratio = torch.exp(logp - inputs["logprobs"])
    coefficient = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -coefficient * logp * inputs["advantages"]


def dro(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """−(logp·A − ½β(logp − q)²)."""
    drift = logp - inputs["logprobs"]
    return -(logp * inputs["advantages"] - 0.5 * config["beta"] * drift.square())


def gspo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """GSPO-token, as Tinker implements it (https://tinker-docs.thinkingmachines.ai/tinker/
    losses/gspo/, after Zheng et al. 2025, arXiv:2507.18071):

        s   = exp( (1/|M|) Σ_{t∈M} (sg(logp_t) − q_t) )       length-normalised sequence ratio
        s_t = sg(s) · p_θ(x_t) / sg(p_θ(x_t))                  value s, gradient of its own logp_t
        ℓ_t = −min(s_t·A_t, clip(s_t, lo, hi)·A_t)

    M is the positions where `sequence_ratio_mask` != 0; without the mask, the positions with
    a non-zero advantage (server choice: the sampled tokens; prompt positions carry
    advantage 0 and sampler logprob 0, which must not enter the mean). An empty M gives
    s = 1. lo and hi are `clip_low_threshold` and `clip_high_threshold` (0.8 and 1.2 unless
    given, as for ppo). Positions with A_t = 0 get neither loss nor gradient."""
    advantages = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = (advantages != 0) if mask is None else (mask != 0)
    in_ratio = in_ratio.to(logp.dtype).expand_as(logp)
    token_log_ratio = logp.detach() - inputs["logprobs"]
    count = in_ratio.sum(-1, keepdim=True)
    log_ratio = (token_log_ratio * in_ratio).sum(-1, keepdim=True) / count.clamp(min=1)
    ratio = torch.exp(log_ratio + logp - logp.detach())
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}
if tuple(LOSSES) != LOSS_FUNCTIONS:  # engine.values is the single list of accepted losses
    raise RuntimeError("every built-in loss needs exactly one implementation")


def elementwise_loss(
    loss_fn: str, logp: torch.Tensor, inputs: Inputs, config: Config
) -> torch.Tensor:
    """Per-token loss of one datum; `config` comes from engine.values.resolve_config."""
    return LOSSES[loss_fn](logp, inputs, config)


# Offsets (in nats) from the given logprobs at which `trained_positions` probes the loss: wide
# enough to leave any clip range on either side, dense enough to land inside it.
PROBE_OFFSETS = (-8.0, -2.0, -0.5, -0.1, 0.0, 0.1, 0.5, 2.0, 8.0)
_AT_GIVEN = PROBE_OFFSETS.index(0.0)
# Log-probabilities a model can actually give, probed as well: the given logprobs are the
# client's word, and far from the model's own (1e18, say) every offset above may sit where
# the loss is flat while the model's logp, wherever it lies in (-inf, 0], is not.
PROBE_LOGPS = (-1000.0, -100.0, -30.0, -10.0, -3.0, -1.0, -0.3, -0.01, -1e-4, 0.0)


class TrainedPositions(NamedTuple):
    """Per target position, derived from the loss itself (d loss / d logp at the probes);
    each array has the shape of the datum's target_tokens, so for (N, K) targets it says
    which candidate at which position is trained."""

    toward: np.ndarray  # bool: some probe lowers the loss by raising logp (negative gradient)
    against: np.ndarray  # bool: some probe lowers the loss by lowering logp (positive gradient)
    pushed_down: np.ndarray  # bool: positive gradient at the given logprobs themselves

    @property
    def trained(self) -> np.ndarray:
        return self.toward | self.against


def trained_positions(
    loss_fn: str, inputs: Mapping[str, np.ndarray], loss_config: Mapping[str, float] | None
) -> TrainedPositions:
    """Which target positions can get a non-zero gradient under `loss_fn` and its config.

    Probes `elementwise_loss` with autograd at several logp values around the datum's own
    `logprobs` (−1 where it has none) and across the range a model's logp can take, so
    clipping and regularisers are covered and a loss added to LOSSES is covered without
    other changes. A non-finite gradient counts as toward. Screening reads this; it is never
    used to compute a loss, and `check_gradient_screened` holds training to it."""
    config = {**LOSS_CONFIG_DEFAULTS[loss_fn], **(loss_config or {})}  # valid (engine.values)
    shape = tuple(np.shape(inputs["target_tokens"]))  # (N,) or (N, K)
    tensors = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64)
               for k, v in inputs.items() if k != "target_tokens"}
    given = tensors.get("logprobs", torch.full(shape, -1.0, dtype=torch.float64))
    axis = (-1, *([1] * len(shape)))
    offsets = torch.tensor(PROBE_OFFSETS, dtype=torch.float64).reshape(axis)
    absolute = torch.tensor(PROBE_LOGPS, dtype=torch.float64).reshape(axis)
    logp = torch.cat([given[None] + offsets,
                      absolute.expand(len(PROBE_LOGPS), *shape)]).requires_grad_()
    try:
        loss = elementwise_loss(loss_fn, logp, tensors, config)
    except KeyError as exc:
        raise UserInputError(f"loss {loss_fn!r} needs loss_fn_inputs[{exc.args[0]!r}]") from exc
    (grad,) = torch.autograd.grad(loss.sum(), logp, allow_unused=True)
    g = np.zeros(tuple(logp.shape)) if grad is None else grad.detach().numpy()
    bad = ~np.isfinite(g)
    return TrainedPositions(toward=np.any((g < 0) | bad, axis=0),
                            against=np.any(g > 0, axis=0),
                            pushed_down=np.asarray(g[_AT_GIVEN] > 0))


def check_gradient_screened(loss_fn: str, logp: torch.Tensor, inputs: Inputs,
                            config: Config) -> None:
    """Refuse a datum whose loss, at the model's own logp, trains a position in a direction
    that `trained_positions` did not report for it: screening read the datum by that
    report, so training never reaches text that screening did not read as trained (toward
    or against), whatever a probe may have missed. `logp` and `inputs` are one datum's,
    as the loss gets them."""
    with torch.enable_grad():
        probe = logp.detach().requires_grad_()
        loss = elementwise_loss(loss_fn, probe, inputs, config)
        (grad,) = torch.autograd.grad(loss.sum(), probe, allow_unused=True)
    if grad is None:
        return
    g = grad.detach().double().cpu().numpy()
    arrays = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    arrays["target_tokens"] = np.zeros(tuple(logp.shape), dtype=np.int64)  # its shape only
    screened = trained_positions(loss_fn, arrays, config)
    unread = ((g < 0) | ~np.isfinite(g)) & ~screened.toward | (g > 0) & ~screened.against
    if unread.any():
        where = [int(i) for i in np.argwhere(unread)[0]]
        raise UserInputError(
            f"the {loss_fn} loss with this loss_fn_config and these loss_fn_inputs trains "
            f"target position {where} in a direction screening did not read it as trained; "
            "send logprobs the sampler returned (log-probabilities, at most 0) and a "
            "loss_fn_config in its documented range")
