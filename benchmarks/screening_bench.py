"""Screening benchmark, on the project's own evaluation data (benchmarks/screening_data.py,
kept apart from the behaviour bank):

1. the harmful-request screen's AUROC and TPR at 1% and 5% FPR (threshold set on the
   benign look-alikes), plus the shipped threshold's TPR and FPR;
2. screening throughput in chat datums per second (cold cache);
3. the share of a forward_backward's wall time spent screening, side by side in one run,
   for a realistic batch (8 chat datums of ~128 tokens on SmolLM2-135M): first call
   (cold cache) and repeated call (verdicts cached). Targets: < 10% first, < 2% repeated.

    python -m benchmarks.screening_bench [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from audit.db import make_engine, make_sessionmaker
from benchmarks.screening_data import BENIGN, HARMFUL
from engine.backend import TrainingDatum
from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry, fast_tokenizer
from gateway.screening import decode_datum
from migrations import upgrade_to_head
from policy.screening.batch import DatumTexts, screen_batch
from policy.screening.screener import Screener, load_config

FIRST_TARGET, REPEATED_TARGET = 0.10, 0.02


def auroc(pos: list[float], neg: list[float]) -> float:
    """Probability that a harmful request outscores a benign one (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(pos: list[float], neg: list[float], fpr: float) -> float:
    threshold = float(np.quantile(neg, 1 - fpr, method="higher"))
    return sum(p > threshold for p in pos) / len(pos)


def detection(screener: Screener) -> list[str]:
    clf = next(c for c in screener.classifiers if c.name == "harmful_request")
    pos = [max(s.values()) for s in clf.score(HARMFUL)]
    neg = [max(s.values()) for s in clf.score(BENIGN)]
    shipped = screener.config.threshold("harmful_request", {})
    return [
        f"harmful-request screen on {len(HARMFUL)} harmful / {len(BENIGN)} benign look-alike "
        "requests (not in the bank):",
        f"  AUROC {auroc(pos, neg):.3f}; TPR at 1% FPR {tpr_at_fpr(pos, neg, 0.01):.2f}; "
        f"TPR at 5% FPR {tpr_at_fpr(pos, neg, 0.05):.2f}",
        f"  shipped threshold {shipped}: TPR {sum(p >= shipped for p in pos) / len(pos):.2f}, "
        f"FPR {sum(n >= shipped for n in neg) / len(neg):.2f}",
    ]


def chat_texts(n: int, salt: str) -> list[DatumTexts]:
    return [DatumTexts(prompt=f"user: {BENIGN[i % len(BENIGN)]} ({salt} {i})",
                       completion=f"Here is a careful answer, number {i} ({salt}).",
                       against="", values=(1.0,), kind="weights") for i in range(n)]


def throughput(screener: Screener, n: int = 200) -> str:
    texts = chat_texts(n, f"throughput-{time.time_ns()}")
    start = time.perf_counter()
    screen_batch(screener, texts)
    rate = n / (time.perf_counter() - start)
    return f"screening throughput: {rate:,.0f} chat datums/s (cold cache, prompt + completion)"


def realistic_batch(tok_dir: str, salt: str) -> list[TrainingDatum]:
    tok = fast_tokenizer(tok_dir)
    data = []
    for i in range(8):
        prompt = tok.encode(f"<|im_start|>user\n{BENIGN[i]} Please explain in detail, "
                            f"with examples ({salt} {i}).<|im_end|>\n<|im_start|>assistant\n").ids
        answer = tok.encode(" ".join(["This is a thorough, friendly and accurate answer."] * 8)
                            ).ids
        tokens = (prompt + answer)[:129]
        weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(tokens) - len(prompt))
        data.append(TrainingDatum(
            tokens=np.asarray(tokens[:-1], np.int64),
            loss_inputs={"target_tokens": np.asarray(tokens[1:], np.int64),
                         "weights": np.asarray(weights, np.float32)}))
    return data


def share_of_wall_time(screener: Screener, data_dir: Path, rounds: int) -> list[str]:
    from engine.torch_backend import load_backend

    registry = ModelRegistry(data_dir)
    info = registry.info(DEFAULT_BASE_MODEL)
    backend = load_backend(registry, DEFAULT_BASE_MODEL, None)
    backend.create_adapter("bench", _lora())
    first, repeated = [], []
    for r in range(rounds):
        data = realistic_batch(info.tokenizer_dir, f"round-{r}-{time.time_ns()}")
        for bucket in (first, repeated):  # the same batch twice: cold, then cached
            start = time.perf_counter()
            screen_batch(screener, [decode_datum(d, fast_tokenizer(info.tokenizer_dir),
                                                 "cross_entropy") for d in data])
            screening = time.perf_counter() - start
            start = time.perf_counter()
            backend.forward_backward("bench", data, "cross_entropy", {}, False)
            training = time.perf_counter() - start
            bucket.append(screening / (screening + training))
    f, rep = statistics.median(first), statistics.median(repeated)
    return [f"share of forward_backward wall time spent screening (8 datums x ~128 tokens, "
            f"{DEFAULT_BASE_MODEL}, median of {rounds}):",
            f"  first call {f:.1%} (target < {FIRST_TARGET:.0%}; ratio {FIRST_TARGET / f:.1f})",
            f"  repeated call {rep:.1%} (target < {REPEATED_TARGET:.0%}; "
            f"ratio {REPEATED_TARGET / rep:.1f})"]


def _lora():  # type: ignore[no-untyped-def]
    from engine.backend import LoraSpec

    return LoraSpec(rank=16, seed=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default="data/bench",
                        help="where the base model is prepared (reused between runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'screening.db'}"
        upgrade_to_head(url)
        engine = make_engine(url)
        screener = Screener.build(load_config(), make_sessionmaker(engine))
        lines = detection(screener)
        lines.append(throughput(screener))
        lines += share_of_wall_time(screener, Path(args.data_dir), args.rounds)
        engine.dispose()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
