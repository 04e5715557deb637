"""Training throughput through the gateway vs. plain in-process PEFT, side by side.

Measures tokens/s of forward_backward + optim_step on SmolLM2-135M-Instruct (rank-16
LoRA on every linear layer, batch 4 × 128 tokens by default) two ways in one run, on
real English text (Python's own Language Reference, tokenized with the model's tokenizer),
new text every step, the same text for both:

  plain    — transformers + peft + torch.optim.AdamW in this process, no gateway;
  gateway  — the official tinker SDK against `loragate serve` running as its own process
             on 127.0.0.1 (SQLite, embedded worker), as deployed: protobuf, admission,
             audit rows, the futures queue and long-polling included.

Rounds alternate between the two so machine drift hits both; the medians and their ratio
are printed, with the median of the per-round ratios. Target: ratio >= 0.9.

    python benchmarks/train_throughput.py [--rounds 3] [--steps 4] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine.host_memory import retain_freed_memory  # noqa: E402
from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry  # noqa: E402

LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-12


def english_text() -> str:
    """Real English prose that ships with Python itself: the Language Reference sections
    behind `help()` (`pydoc_data.topics`, about 450 kB), without their indented code and
    grammar blocks and heading rules, each paragraph unwrapped to one line. Nothing is
    downloaded; the same text, in the same order, on every run."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t")):
                continue  # code examples and grammar rules
            lines = [ln for ln in lines if not re.fullmatch(r"[*=\-~^]+", ln.strip())]
            if lines:
                paragraphs.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(paragraphs)


def make_batches(model_dir: Path, n_batches: int, batch: int, seq_len: int
                 ) -> list[list[list[int]]]:
    """`n_batches` batches of `batch` sequences of `seq_len + 1` token ids each: consecutive,
    non-overlapping chunks of `english_text()` tokenized with the model's own tokenizer, so
    every step trains on new real text (nothing is served from the screening cache) and
    the plain baseline and the gateway see the same chunks in the same order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    paragraphs = english_text().split("\n\n")
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids = [t for row in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
           for t in [*row, *sep]]
    size = seq_len + 1
    needed = n_batches * batch * size
    if len(ids) < needed:
        raise SystemExit(f"the text has {len(ids)} tokens; {n_batches} batches of {batch} x "
                         f"{size} need {needed} (fewer rounds, steps, batch or seq-len)")
    chunks = [ids[i:i + size] for i in range(0, needed, size)]
    return [chunks[i:i + batch] for i in range(0, len(chunks), batch)]


class PlainPeft:
    """The baseline: what a researcher would run locally with PEFT."""

    def __init__(self, model_dir: Path, rank: int) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from engine.torch_backend import LORA_ALPHA
        from engine.values import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                            target_modules=[*ATTN_MODULES, *MLP_MODULES, *UNEMBED_MODULES])
        self.model = get_peft_model(base, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(self, seqs: list[list[int]]) -> float:
        ids = torch.tensor([s[:-1] for s in seqs])
        targets = torch.tensor([s[1:] for s in seqs])
        logits = self.model(input_ids=ids).logits.float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss = -logprobs.sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class ThroughGateway:
    def __init__(self, base_url: str, key: str, rank: int) -> None:
        import tinker

        self.tinker = tinker
        self.client = tinker.ServiceClient(base_url=base_url, api_key=key)
        self.trainer = self.client.create_lora_training_client(
            base_model=DEFAULT_BASE_MODEL, rank=rank, seed=0).result()

    def step(self, seqs: list[list[int]]) -> float:
        types = self.tinker.types
        data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                            loss_fn_inputs={"target_tokens": s[1:],
                                            "weights": [1.0] * (len(s) - 1)}) for s in seqs]
        fb = self.trainer.forward_backward(data, "cross_entropy")
        opt = self.trainer.optim_step(types.AdamParams(learning_rate=LR, beta1=BETAS[0],
                                                       beta2=BETAS[1], eps=EPS))
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        return float(loss)


@contextlib.contextmanager
def gateway_process(data_dir: Path, tmp: str) -> Iterator[tuple[str, str]]:
    """`loragate serve` in a subprocess with its own SQLite file; yields (url, key)."""
    from gateway.embedded import serve_in_subprocess

    env = {**os.environ, "LORAGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db"}
    key = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--role",
                          "researcher", "--owner", "bench", "--data-dir", str(data_dir)],
                         env=env, check=True, text=True, capture_output=True,
                         cwd=ROOT).stdout.strip()
    with serve_in_subprocess(data_dir, env=env, start_timeout=300) as url:
        yield url, key


def tokens_per_second(runner, batches: list[list[list[int]]], label: str) -> float:
    """One step per batch (each batch new text)."""
    tokens = sum(len(s) - 1 for seqs in batches for s in seqs)
    start = time.perf_counter()
    for seqs in tqdm(batches, desc=label, leave=False):
        runner.step(seqs)
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args()
    # The gateway's processes keep freed memory (engine.host_memory); so does the in-process
    # baseline, so the ratio measures the gateway, not the allocator setting.
    retain_freed_memory()

    data_dir = Path(args.data_dir)
    registry = ModelRegistry(data_dir)
    model_dir = registry.materialize(DEFAULT_BASE_MODEL)
    with tempfile.TemporaryDirectory() as tmp, gateway_process(data_dir, tmp) as (url, key):
        plain = PlainPeft(model_dir, args.rank)
        gateway = ThroughGateway(url, key, args.rank)
        batches = make_batches(model_dir, args.warmup + args.rounds * args.steps,
                               args.batch, args.seq_len)
        warmup, timed = batches[:args.warmup], batches[args.warmup:]
        for runner in (plain, gateway):
            for seqs in warmup:
                runner.step(seqs)
        results: dict[str, list[float]] = {"plain": [], "gateway": []}
        for r in range(args.rounds):
            round_batches = timed[r * args.steps:(r + 1) * args.steps]
            results["plain"].append(tokens_per_second(plain, round_batches,
                                                      f"round {r + 1} plain"))
            results["gateway"].append(tokens_per_second(gateway, round_batches,
                                                        f"round {r + 1} gateway"))
        gateway.client.close("success").result()

    plain_tps, gw_tps = (statistics.median(results[k]) for k in ("plain", "gateway"))
    # Each round measures both back to back, so its ratio is the least drift-prone figure.
    paired = [g / p for g, p in zip(results["gateway"], results["plain"], strict=True)]
    print(f"model {DEFAULT_BASE_MODEL}, rank {args.rank}, batch {args.batch} x {args.seq_len} "
          f"tokens, {args.rounds} rounds x {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}, device cpu")
    for name in ("plain", "gateway"):
        runs = ", ".join(f"{v:.1f}" for v in results[name])
        print(f"{name:>8}: median {statistics.median(results[name]):7.1f} tokens/s  ({runs})")
    print(f"ratio gateway/plain, median of per-round ratios: {statistics.median(paired):.3f} "
          f"({', '.join(f'{r:.3f}' for r in paired)})  (target >= 0.9)")
    print(f"ratio of the medians: {gw_tps / plain_tps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
