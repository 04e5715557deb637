"""Screening benchmark:

1. per-example detection on the harm classifier corpus's held-out sources (whole sources
   never trained, validated or calibrated on: training/harm_classifier/): per source TPR or
   FPR at the shipped threshold, AUROC harmful vs everyday and vs borderline, everyday FPR —
   for the default harmful-content classifier and, for comparison, the bank kNN screen;
   per-example detection of answers as trained completions on held-out answer sets (the
   release benchmark's harmful, everyday and borderline answers), alone and with their
   requests; held-out harmful requests written in obfuscated forms (look-alike letters,
   leetspeak, spaced or reversed letters, …), and how often the readability screen names a
   language in English requests;
2. screening throughput in chat datums per second (cold cache);
3. the share of a forward_backward's wall time spent screening, side by side in one run,
   for a realistic batch (8 chat datums of ~128 tokens on SmolLM2-135M): first call
   (cold cache) and repeated call (verdicts cached). Targets: < 10% first, < 2% repeated.

    python -m benchmarks.screening_bench [--rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from audit.db import make_engine, make_sessionmaker
from benchmarks.screening_data import (
    BENIGN,
    KEYWORD_ENCODINGS,
    OBFUSCATIONS,
    WORD_ENCODINGS,
)
from benchmarks.screening_sim import simulate
from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry, fast_tokenizer
from engine.values import TrainingDatum
from gateway.screening import decode_datum
from migrations import upgrade_to_head
from policy.screening.batch import DatumTexts, screen_batch
from policy.screening.harm_classifier import card
from policy.screening.harmful_requests import HarmfulRequestScreen, MiniLM, load_banks
from policy.screening.screener import COMPLETION, REQUEST, Screener, TallyLimits, load_config

FIRST_TARGET, REPEATED_TARGET = 0.10, 0.02


CORPUS = Path(__file__).resolve().parents[1] / "training" / "harm_classifier" / "corpus.jsonl.gz"


def auroc(pos: list[float], neg: list[float]) -> float:
    """Probability that a harmful request outscores a benign one (ties count half)."""
    if not pos or not neg:
        return float("nan")
    scores = np.asarray(neg)
    ordered = np.sort(scores)
    wins = sum(np.searchsorted(ordered, p, "left") + 0.5 * (np.searchsorted(ordered, p, "right")
               - np.searchsorted(ordered, p, "left")) for p in pos)
    return float(wins) / (len(pos) * len(neg))


def heldout_rows() -> list[dict[str, str]]:
    """The corpus's held-out sources: whole sources the classifier never saw in training,
    validation or calibration (training/harm_classifier/build_corpus.py HELDOUT)."""
    with gzip.open(CORPUS, "rt") as fh:
        return [r for r in map(json.loads, fh) if r["split"] == "heldout"]


def detection_report(name: str, scores: list[float], rows: list[dict[str, str]],
                     threshold: float) -> list[str]:
    by_label: dict[str, list[float]] = defaultdict(list)
    by_source: dict[str, list[float]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for score, row in zip(scores, rows, strict=True):
        by_label[row["label"]].append(score)
        by_source[row["source"]].append(score)
        label_of[row["source"]] = row["label"]
    pos = by_label["harmful"]
    lines = [f"{name}, threshold {threshold}:",
             f"  AUROC harmful vs everyday {auroc(pos, by_label['everyday']):.3f}, "
             f"vs borderline {auroc(pos, by_label['borderline']):.3f}"]
    for label in ("harmful", "everyday", "borderline"):
        got = by_label[label]
        rate = sum(s >= threshold for s in got) / len(got)
        lines.append(f"  {label:10s} n={len(got):4d} {'TPR' if label == 'harmful' else 'FPR'} "
                     f"{rate:.3f}")
    for source, got in sorted(by_source.items()):
        rate = sum(s >= threshold for s in got) / len(got)
        what = "TPR" if label_of[source] == "harmful" else "FPR"
        lines.append(f"    {source:20s} ({label_of[source]:10s}) n={len(got):4d} {what} "
                     f"{rate:.3f}")
    return lines


def detection(screener: Screener) -> list[str]:
    """Per-example detection on held-out sources: the default harmful-content classifier at
    its shipped threshold, and for comparison the behaviour-bank kNN screen (operator
    extension) at its policy threshold."""
    rows = heldout_rows()
    texts = [r["text"] for r in rows]
    lines = [f"detection on held-out sources ({len(rows)} requests; never trained, validated "
             "or calibrated on):"]
    clf = next(c for c in screener.classifiers if c.name == "harmful_content")
    scores = [max(s.values()) for s in clf.score(texts)]
    threshold = screener.config.threshold("harmful_content", {})
    lines += detection_report(f"harmful_content ({clf.version})", scores, rows, threshold)
    lines += dataset_simulation(screener, scores, rows, threshold)
    bank = HarmfulRequestScreen(MiniLM(), load_banks())
    scores = [max(s.values()) for s in bank.score(texts)]
    lines += detection_report("harmful_request bank kNN (operator extension)", scores, rows,
                              screener.config.threshold("harmful_request", {}))
    return lines


def obfuscation(screener: Screener) -> list[str]:
    """Held-out harmful requests written in each of OBFUSCATIONS: the share flagged by the
    harmful-content classifier reading them as written, and by the screener (which also
    reads their canonical form, and flags look-alike letters as encoding), and written in
    each of WORD_ENCODINGS (which the readability screen refuses) and KEYWORD_ENCODINGS
    (read with each encoded word decoded); and how often the
    readability screen names a language or a word encoding in the held-out everyday and
    borderline requests (all English)."""
    rows = heldout_rows()
    harmful = [r["text"] for r in rows if r["label"] == "harmful"]
    english = [r["text"] for r in rows if r["label"] != "harmful"]
    clf = next(c for c in screener.classifiers if c.name == "harmful_content")
    threshold = screener.config.threshold("harmful_content", {})
    lines = [f"obfuscated held-out harmful requests (n = {len(harmful)}): flagged by "
             "harmful_content as written -> by the screener (canonical form, encoding signals)"]
    for how, write in {"as written": str, **OBFUSCATIONS, **WORD_ENCODINGS,
                       **KEYWORD_ENCODINGS}.items():
        texts = [write(t) for t in harmful]
        alone = sum(max(s.values()) >= threshold for s in clf.score(texts)) / len(texts)
        screened = sum(bool(v.flagged) for v in screener.screen(texts, REQUEST)) / len(texts)
        lines.append(f"  {how:26s} {alone:.3f} -> {screened:.3f}")
    unread = sum(any(k.startswith("readability.") for k in v.flagged)
                 for v in screener.screen(english, REQUEST))
    lines.append(f"readability: a language or a word encoding named in {unread} of "
                 f"{len(english)} held-out English everyday and borderline requests")
    return lines


ANSWER_SETS = Path(__file__).resolve().parents[1] / "training" / "release_data"


def answer_detection(screener: Screener) -> list[str]:
    """Per-example detection of answers, on sets neither screen trained on (the release
    benchmark's: real complying answers to harmful hh-rlhf requests, everyday and
    borderline-benign requests with their preferred answers): the answer alone as a trained
    completion (every classifier that reads completions), the request alone, and the datum
    (either flagged)."""
    lines = ["detection of answers on held-out answer sets (training/release_data/bench_*; "
             "never trained on):"]
    for name in ("harmful", "everyday", "borderline"):
        with gzip.open(ANSWER_SETS / f"bench_{name}.jsonl.gz", "rt") as fh:
            rows = [json.loads(line) for line in fh]
        answers = screener.screen([r["answer"] for r in rows], COMPLETION)
        requests = screener.screen([r["prompt"] for r in rows], REQUEST)
        by_head = {c.name: sum(any(k.startswith(c.name + ".") for k in v.flagged)
                               for v in answers) / len(rows)
                   for c in screener.classifiers if COMPLETION in c.applies_to
                   and c.name.startswith("harmful_")}
        alone = sum(bool(v.flagged) for v in answers) / len(rows)
        asked = sum(bool(v.flagged) for v in requests) / len(rows)
        either = sum(bool(a.flagged or q.flagged) for a, q in zip(answers, requests,
                                                                  strict=True)) / len(rows)
        what = "TPR" if name == "harmful" else "FPR"
        heads = ", ".join(f"{k} {v:.3f}" for k, v in by_head.items())
        lines.append(f"  {name:10s} n={len(rows):4d} {what}: answer alone {alone:.3f} "
                     f"({heads}), request alone {asked:.3f}, either {either:.3f}")
    return lines


def dataset_simulation(screener: Screener, scores: list[float], rows: list[dict[str, str]],
                       threshold: float) -> list[str]:
    """Dataset-level decisions (benchmarks.screening_sim) at the rates measured above: the
    held-out TPR, and as the everyday flag rate the larger of the held-out everyday FPR and
    the classifier's calibrated one (its card: validation split, pooled over sources)."""
    high = screener.config.high_confidence_threshold("harmful_content.violence") or 2.0
    harmful = [s for s, r in zip(scores, rows, strict=True) if r["label"] == "harmful"]
    everyday = [s for s, r in zip(scores, rows, strict=True) if r["label"] == "everyday"]
    tpr = float(np.mean([s >= threshold for s in harmful]))
    calibrated = card()["calibrated_everyday_fpr"]
    fpr = max(float(np.mean([s >= threshold for s in everyday])), calibrated["request"])
    fpr_high = max(float(np.mean([s >= high for s in everyday])), calibrated["high_confidence"])
    tpr_high = float(np.mean([s >= high for s in harmful]))
    limits = screener.config.tally
    lines = [f"dataset-level decisions (p0 {limits.null_flag_rate}, alpha {limits.alpha}, "
             f"high-confidence cap {limits.high_confidence_cap}; everyday flag rate {fpr:.4f} "
             f"(high-confidence {fpr_high:.4f}), harmful TPR {tpr:.3f} (high-confidence "
             f"{tpr_high:.3f}); batches of 32; 2,000 simulated runs each):"]
    for share, n in ((0.0, 2000), (0.0, 10000), (0.01, 10000), (0.02, 2000), (0.05, 2000),
                     (0.05, 400), (1.0, 32)):
        r = simulate(limits, honest_fpr=fpr, harmful_tpr=tpr, harmful_share=max(share, 1e-9),
                     n_examples=n, runs=2000 if n <= 2000 else 400,
                     honest_high=fpr_high / fpr, harmful_high=tpr_high / max(tpr, 1e-9))
        what = ("honest" if share == 0 else f"{share:.0%} harmful")
        blocked = r.honest_blocked if share == 0 else r.poisoned_blocked
        tail = ("" if share == 0 else f"; median examples to block {r.median_examples_to_block}"
                f", 95th percentile {r.p95_examples_to_block}")
        lines.append(f"  {what:13s} run of {n:5d}: blocked within it {blocked:.3f}{tail}")
    return lines + per_source_honest_runs(limits, fpr_high / fpr)


def per_source_honest_runs(limits: TallyLimits, high_share: float) -> list[str]:
    """An honest 2,000-example run drawn from one everyday source, at that source's flag
    rate on the classifier's validation split (its card): the rule assumes one everyday
    rate, p0, and sources differ."""
    per_source = card()["val"]["per_source_at_threshold"]
    lines = ["honest 2,000-example runs at one validation source's everyday flag rate (high-"
             f"confidence share of flags {high_share:.2f}; 2,000 simulated runs each):"]
    for source, row in sorted(per_source.items()):
        if row["label"] != "everyday" or row["n"] < 50:
            continue
        rate = float(row["flagged"])
        blocked = simulate(limits, honest_fpr=rate, harmful_tpr=0.0, harmful_share=1e-9,
                           honest_high=high_share).honest_blocked if rate else 0.0
        lines.append(f"  {source:20s} n {row['n']:4d}  flagged {rate:.3f}  "
                     f"blocked {blocked:.3f}")
    return lines


def chat_texts(n: int, salt: str) -> list[DatumTexts]:
    return [DatumTexts(requests=(f"{BENIGN[i % len(BENIGN)]} ({salt} {i})",),
                       completions=(f"Here is a careful answer, number {i} ({salt}).",),
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
    first: list[float] = []
    repeated: list[float] = []
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
    from engine.values import LoraSpec

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
        lines += obfuscation(screener)
        lines += answer_detection(screener)
        lines.append(throughput(screener))
        lines += share_of_wall_time(screener, Path(args.data_dir), args.rounds)
        engine.dispose()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
