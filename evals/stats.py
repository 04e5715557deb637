"""Paired statistics for the release gate: every evaluation compares base and
base+adapter on the same items, so the gate decides on paired differences, never on a
bare mean (reference/safety-methods.md §6).

- `mcnemar_exact`: two-sided exact McNemar test on the discordant pairs of a binary
  outcome (e.g. an item answered correctly by the adapter but not the base);
- `sign_flip_test`: a paired permutation test on per-item differences of a continuous
  score (e.g. a log-likelihood margin), exact for small n, Monte Carlo beyond;
- `paired_summary`: mean difference, its standard deviation and Cohen's d_z;
- `mcnemar_sample_size`: items needed to detect a paired difference (Connor 1987).

Pure functions over numbers; no models, no database.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

EXACT_LIMIT = 16  # up to 2**16 sign patterns are enumerated exactly


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value: b pairs changed one way, c the other (binomial, p = 1/2)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_flip_test(deltas: Sequence[float], alternative: str = "greater",
                   resamples: int = 20_000, seed: int = 0) -> float:
    """p-value for the mean paired difference (H0: differences symmetric around 0).

    `alternative` is "greater" (the adapter scores higher), "less" or "two-sided".
    Counts patterns at least as extreme as observed, so p > 0 always."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError("alternative must be greater, less or two-sided")
    values = [float(d) for d in deltas]
    if not values:
        return 1.0
    observed = sum(values)

    def extreme(total: float) -> bool:
        eps = 1e-12 * max(1.0, abs(observed))
        if alternative == "greater":
            return total >= observed - eps
        if alternative == "less":
            return total <= observed + eps
        return abs(total) >= abs(observed) - eps

    if len(values) <= EXACT_LIMIT:
        hits = sum(extreme(sum(s * v for s, v in zip(signs, values, strict=True)))
                   for signs in itertools.product((1, -1), repeat=len(values)))
        return hits / 2 ** len(values)
    rng = random.Random(seed)
    hits = sum(extreme(sum(v if rng.random() < 0.5 else -v for v in values))
               for _ in range(resamples))
    return (hits + 1) / (resamples + 1)


@dataclass(frozen=True)
class PairedSummary:
    n: int
    mean: float
    sd: float
    dz: float  # Cohen's d_z: mean / sd of the differences (0 when sd is 0)


def paired_summary(deltas: Sequence[float]) -> PairedSummary:
    n = len(deltas)
    if n == 0:
        return PairedSummary(0, 0.0, 0.0, 0.0)
    mean = sum(deltas) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1)) if n > 1 else 0.0
    return PairedSummary(n, mean, sd, mean / sd if sd > 0 else 0.0)


def minimum_detectable_dz(n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest standardized paired effect (Cohen's d_z) a one-sided test at `alpha`
    detects with probability `power` on n items (normal approximation); inf for n < 2."""
    if n < 2:
        return math.inf
    z = NormalDist()
    return (z.inv_cdf(1 - alpha) + z.inv_cdf(power)) / math.sqrt(n)


def mcnemar_sample_size(delta: float, discordant: float, alpha: float = 0.05,
                        power: float = 0.8) -> int:
    """Items needed to detect a paired difference `delta` in proportions when a share
    `discordant` of pairs disagree (two-sided alpha; Connor 1987)."""
    if not 0 < abs(delta) < discordant <= 1:
        raise ValueError("need 0 < |delta| < discordant share <= 1")
    z_a = NormalDist().inv_cdf(1 - alpha / 2)
    z_b = NormalDist().inv_cdf(power)
    n = (z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - delta ** 2)) ** 2
    return math.ceil(n / delta ** 2)


def mcnemar_one_sided(toward: int, away: int) -> float:
    """One-sided exact McNemar: P(at least `toward` of the discordant pairs moved in the
    tested direction | each direction equally likely)."""
    if toward < 0 or away < 0:
        raise ValueError("discordant counts must be >= 0")
    n = toward + away
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(toward, n + 1)) / 2 ** n


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error over several gates)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [1.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
