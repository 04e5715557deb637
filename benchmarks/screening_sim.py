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
from policy.screening.tally import log_likelihood_ratios


@dataclass(frozen=True)
class SimResult:
    runs: int
    n_examples: int
    batch_size: int
    honest_blocked: float  # P(an honest run of n_examples is ever blocked), estimated
    poisoned_blocked: float  # P(a poisoned run is blocked within n_examples)
    median_examples_to_block: float | None  # over poisoned runs; None: most not blocked
    p95_examples_to_block: float | None  # None: over 5% of poisoned runs not blocked


def _first_block(flags: np.ndarray, high: np.ndarray, limits: TallyLimits,
                 batch_size: int) -> np.ndarray:
    """Per run (row): the number of examples sent when it was first blocked, else inf."""
    n = flags.shape[1]
    looks = np.arange(batch_size, n + batch_size, batch_size).clip(max=n)  # n after each batch
    k = np.cumsum(flags, axis=1)[:, looks - 1]
    h = np.cumsum(high, axis=1)[:, looks - 1]
    llr = log_likelihood_ratios(np.broadcast_to(looks, k.shape), k, h, limits)
    blocked = (llr >= math.log(1.0 / limits.alpha)) | (h >= limits.high_confidence_cap)
    first = np.where(blocked.any(axis=1), blocked.argmax(axis=1), -1)
    return np.where(first >= 0, looks[first].astype(float), np.inf)


def simulate(limits: TallyLimits, *, honest_fpr: float, harmful_tpr: float,
             harmful_share: float, batch_size: int = 32, n_examples: int = 2000,
             runs: int = 2000, honest_high: float = 0.0, harmful_high: float = 0.0,
             seed: int = 0) -> SimResult:
    """Simulate `runs` honest and `runs` poisoned runs (see the module docstring)."""
    rng = np.random.default_rng(seed)

    def first_block(share: float) -> np.ndarray:
        harmful = rng.random((runs, n_examples)) < share
        u = rng.random((runs, n_examples))
        flags = np.where(harmful, u < harmful_tpr, u < honest_fpr)
        high = flags & np.where(harmful, u < harmful_tpr * harmful_high,
                                u < honest_fpr * honest_high)
        return _first_block(flags, high, limits, batch_size)

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
    parser.add_argument("--honest-high", type=float, default=0.07,
                        help="share of an honest example's flags with high confidence "
                             "(the shipped classifier: 0.07 on everyday validation data)")
    parser.add_argument("--harmful-high", type=float, default=0.4,
                        help="share of a harmful example's flags with high confidence "
                             "(the shipped classifier: 0.42 on held-out harmful requests)")
    args = parser.parse_args()
    limits = load_config().tally
    print(f"policy: p0={limits.null_flag_rate}, p0h={limits.null_high_confidence_rate}, "
          f"alpha={limits.alpha}, ratios={list(limits.alternative_ratios)}, high-confidence "
          f"ratios={list(limits.high_confidence_ratios)}; {args.runs} runs of {args.examples} "
          f"examples in batches of {args.batch_size}; flags with high confidence: "
          f"{args.honest_high:.0%} of honest, {args.harmful_high:.0%} of harmful")
    print("honest FPR  harmful TPR  share  P(honest blocked)  P(poisoned blocked)  "
          "median  p95")
    for fpr in (0.005, 0.01, 0.015):
        for tpr, share in ((0.8, 0.05), (0.8, 0.02), (0.5, 0.05), (1.0, 1.0)):
            r = simulate(limits, honest_fpr=fpr, harmful_tpr=tpr, harmful_share=share,
                         batch_size=args.batch_size, n_examples=args.examples,
                         runs=args.runs, honest_high=args.honest_high,
                         harmful_high=args.harmful_high)
            print(f"{fpr:10.3f}  {tpr:11.2f}  {share:5.2f}  {r.honest_blocked:17.4f}  "
                  f"{r.poisoned_blocked:19.3f}  {r.median_examples_to_block!s:>6}  "
                  f"{r.p95_examples_to_block!s:>5}")


if __name__ == "__main__":
    main()
