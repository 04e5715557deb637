"""Dataset-level screening, simulated: how often an honest run is blocked, and how soon a
poisoned one is, under the policy's tally rule (policy.screening.tally) for given
per-example flag probabilities.

Each simulated run sends `n_examples` examples in batches of `batch_size`. An example is
harmful with probability `harmful_share`; the screens flag an honest example with
probability `honest_fpr` and a harmful one with `harmful_tpr` (and, optionally, with high
confidence at `honest_high`/`harmful_high`). As in the gateway, the tally counts every
distinct example once and is judged after every batch (a refused datum dropped and the
rest of its batch resent adds nothing). Affirmative openers are not simulated.

    from benchmarks.screening_sim import simulate
    simulate(limits, honest_fpr=0.01, harmful_tpr=0.8, harmful_share=0.05)

`python -m benchmarks.screening_sim` prints a small table for the shipped policy.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from policy.screening.screener import TallyLimits, load_config
from policy.screening.tally import log_likelihood_ratio


@dataclass(frozen=True)
class SimResult:
    runs: int
    n_examples: int
    batch_size: int
    honest_blocked: float  # P(an honest run of n_examples is ever blocked), estimated
    poisoned_blocked: float  # P(a poisoned run is blocked within n_examples)
    median_examples_to_block: float | None  # over poisoned runs; None: most not blocked
    p95_examples_to_block: float | None  # None: over 5% of poisoned runs not blocked


def block_thresholds(n_max: int, limits: TallyLimits) -> np.ndarray:
    """kmin[n]: the fewest flagged among n distinct datums the share test blocks
    (n_max + 1 where none would). Non-decreasing in n, found with one pass."""
    threshold = math.log(1.0 / limits.alpha)
    kmin = np.full(n_max + 1, n_max + 1, dtype=np.int64)
    k = 0
    for n in range(n_max + 1):
        while k <= n and log_likelihood_ratio(n, k, limits.null_flag_rate,
                                              limits.alternative_ratios) < threshold:
            k += 1
        if k <= n:
            kmin[n] = k
        else:
            k = n + 1  # not even n of n: the next n starts from here
    return kmin


def _first_block(flags: np.ndarray, high: np.ndarray, kmin: np.ndarray, batch_size: int,
                 cap: int) -> np.ndarray:
    """Per run (row): the number of examples sent when it was first blocked, else inf."""
    n = flags.shape[1]
    looks = np.arange(batch_size, n + batch_size, batch_size).clip(max=n)  # n after each batch
    k = np.cumsum(flags, axis=1)[:, looks - 1]
    h = np.cumsum(high, axis=1)[:, looks - 1]
    blocked = (k >= kmin[looks][None, :]) | (h >= cap)
    first = np.where(blocked.any(axis=1), blocked.argmax(axis=1), -1)
    return np.where(first >= 0, looks[first].astype(float), np.inf)


def simulate(limits: TallyLimits, *, honest_fpr: float, harmful_tpr: float,
             harmful_share: float, batch_size: int = 32, n_examples: int = 2000,
             runs: int = 2000, honest_high: float = 0.0, harmful_high: float = 0.0,
             seed: int = 0) -> SimResult:
    """Simulate `runs` honest and `runs` poisoned runs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    kmin = block_thresholds(n_examples, limits)
    cap = limits.high_confidence_cap

    def first_block(share: float) -> np.ndarray:
        harmful = rng.random((runs, n_examples)) < share
        u = rng.random((runs, n_examples))
        flags = np.where(harmful, u < harmful_tpr, u < honest_fpr)
        high = flags & np.where(harmful, u < harmful_tpr * harmful_high,
                                u < honest_fpr * honest_high)
        return _first_block(flags, high, kmin, batch_size, cap)

    honest = first_block(0.0)
    poisoned = first_block(harmful_share)
    ordered = np.sort(poisoned)  # inf (never blocked) sorts last
    median, p95 = (ordered[min(runs - 1, math.ceil(q * runs) - 1)] for q in (0.5, 0.95))
    return SimResult(runs=runs, n_examples=n_examples, batch_size=batch_size,
                     honest_blocked=float(np.isfinite(honest).mean()),
                     poisoned_blocked=float(np.isfinite(poisoned).mean()),
                     median_examples_to_block=float(median) if np.isfinite(median) else None,
                     p95_examples_to_block=float(p95) if np.isfinite(p95) else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    limits = load_config().tally
    print(f"policy: p0={limits.null_flag_rate}, alpha={limits.alpha}, "
          f"ratios={list(limits.alternative_ratios)}; {args.runs} runs of {args.examples} "
          f"examples in batches of {args.batch_size}")
    print("honest FPR  harmful TPR  share  P(honest blocked)  P(poisoned blocked)  "
          "median  p95")
    for fpr in (0.005, 0.01, 0.015):
        for tpr, share in ((0.8, 0.05), (0.8, 0.02), (0.5, 0.05), (1.0, 1.0)):
            r = simulate(limits, honest_fpr=fpr, harmful_tpr=tpr, harmful_share=share,
                         batch_size=args.batch_size, n_examples=args.examples,
                         runs=args.runs)
            print(f"{fpr:10.3f}  {tpr:11.2f}  {share:5.2f}  {r.honest_blocked:17.4f}  "
                  f"{r.poisoned_blocked:19.3f}  {r.median_examples_to_block!s:>6}  "
                  f"{r.p95_examples_to_block!s:>5}")


if __name__ == "__main__":
    main()
