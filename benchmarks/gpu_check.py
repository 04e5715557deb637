"""The CUDA/bf16 path, checked against the CPU/fp32 reference and timed, in one run.

Correctness (same base model, LoRA seed and batch of real text on both devices):
- per-token logprobs and the loss of one `forward_backward`;
- the adapter after one AdamW step (how far the two devices' updates differ, relative to
  the update itself);
- greedy continuations (share of identical tokens; bf16 may flip near-ties).

Throughput on the device, measured side by side in one run (ratios, never absolute bars):
- the backend's `forward_backward` + `optim_step` against plain PEFT on the same device,
  both in bf16, on new real text every step;
- the backend's batched sampling (8 samples x 64 tokens) against HF `generate`;
- four runs' `forward_backward` jobs in one pass (`forward_backward_many`, on by default on
  CUDA) against the same jobs one after the other: the pass must give each job its own
  loss and gradients (checked against running it alone, on the device), and the ratio
  says whether it pays on this device (`LORAGATE_BATCH_ACROSS_RUNS=off` turns it off).

    python -m benchmarks.gpu_check [--device cuda] [--batch 4] [--seq-len 128]
    bash benchmarks/gpu_check.sh     # the same, after checking the machine

Exits 1 when a correctness bound is missed. `--device cpu` runs the same code on the CPU
(both sides fp32: a self-check of the script).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.train_throughput import BETAS, EPS, LR, ROOT, make_batches
from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry
from engine.torch_backend import LORA_ALPHA, TorchBackend, load_backend
from engine.values import (
    ATTN_MODULES,
    MLP_MODULES,
    UNEMBED_MODULES,
    AdamStep,
    LoraSpec,
    SampleSpec,
    TrainingDatum,
)

# bf16 keeps about 3 significant digits: bounds for agreement with the fp32 reference.
MAX_MEAN_LOGPROB_DIFF = 0.05  # nats per token
MAX_LOSS_REL_DIFF = 0.01
MAX_UPDATE_REL_DIFF = 0.1  # |Δ_device - Δ_cpu| / |Δ_cpu| over the adapter after one step


def datums(seqs: list[list[int]]) -> list[TrainingDatum]:
    return [TrainingDatum(np.array(s[:-1]), {
        "target_tokens": np.array(s[1:]), "weights": np.ones(len(s) - 1, np.float32)})
        for s in seqs]


def one_step(backend: TorchBackend, seqs: list[list[int]], rank: int
             ) -> tuple[np.ndarray, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logprobs, loss, adapter before and after one step of a fresh seeded adapter."""
    backend.create_adapter("check", LoraSpec(rank=rank, seed=0))
    try:
        before = backend.adapter_tensors("check")
        result = backend.forward_backward("check", datums(seqs), "cross_entropy", {}, False)
        backend.optim_step("check", AdamStep(learning_rate=LR, beta1=BETAS[0],
                                             beta2=BETAS[1], eps=EPS))
        after = backend.adapter_tensors("check")
    finally:
        backend.drop_adapter("check")
    logprobs = np.concatenate([o["logprobs"] for o in result.outputs])
    return logprobs, float(result.metrics["loss:sum"]), before, after


def correctness(cpu: TorchBackend, dev: TorchBackend, seqs: list[list[int]], rank: int
                ) -> bool:
    lp_cpu, loss_cpu, before, after_cpu = one_step(cpu, seqs, rank)
    lp_dev, loss_dev, _, after_dev = one_step(dev, seqs, rank)
    lp_diff = float(np.abs(lp_cpu - lp_dev).mean())
    loss_diff = abs(loss_dev - loss_cpu) / abs(loss_cpu)
    num = sum(float(((after_dev[k] - before[k]) - (after_cpu[k] - before[k])).norm() ** 2)
              for k in before) ** 0.5
    den = sum(float((after_cpu[k] - before[k]).norm() ** 2) for k in before) ** 0.5
    update_diff = num / den
    prompts = [s[:32] for s in seqs]
    g_cpu = cpu.generate_greedy(None, prompts, 32)
    g_dev = dev.generate_greedy(None, prompts, 32)
    same = np.mean([a == b for x, y in zip(g_cpu, g_dev, strict=True)
                    for a, b in zip(x, y, strict=False)])
    checks = [("mean |Δ logprob| per token", lp_diff, MAX_MEAN_LOGPROB_DIFF),
              ("loss relative difference", loss_diff, MAX_LOSS_REL_DIFF),
              ("AdamW update relative difference", update_diff, MAX_UPDATE_REL_DIFF)]
    ok = True
    for name, value, bound in checks:
        passed = value <= bound
        ok &= passed
        print(f"  {name:34s} {value:.5f}  (bound {bound})  {'ok' if passed else 'FAIL'}")
    print(f"  {'greedy tokens identical':34s} {same:.3f}  (reported; bf16 may flip near-ties)")
    return ok


class PlainPeft:
    """What a researcher would run on the same device with PEFT, in the backend's dtype."""

    def __init__(self, model_dir: Path, rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                            target_modules=[*ATTN_MODULES, *MLP_MODULES, *UNEMBED_MODULES])
        self.model = get_peft_model(base, config)
        self.device = device
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(self, seqs: list[list[int]]) -> None:
        ids = torch.tensor([s[:-1] for s in seqs], device=self.device)
        targets = torch.tensor([s[1:] for s in seqs], device=self.device)
        logits = self.model(input_ids=ids).logits.float()
        loss = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(fn, batches: list[list[list[int]]], device: torch.device) -> float:
    """Tokens per second over the batches."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for seqs in batches:
        fn(seqs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(s) - 1 for b in batches for s in b) / (time.perf_counter() - start)


def throughput(dev: TorchBackend, model_dir: Path, batches: list[list[list[int]]],
               rank: int, rounds: int) -> None:
    plain = PlainPeft(model_dir, rank, dev.device, dev.dtype)
    dev.create_adapter("speed", LoraSpec(rank=rank, seed=0))
    step = AdamStep(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def backend_step(seqs: list[list[int]]) -> None:
        dev.forward_backward("speed", datums(seqs), "cross_entropy", {}, False)
        dev.optim_step("speed", step)

    per_round = len(batches) // (rounds + 1)
    for seqs in batches[:per_round]:  # warm-up
        plain.step(seqs)
        backend_step(seqs)
    ratios = []
    for r in range(1, rounds + 1):
        chunk = batches[r * per_round:(r + 1) * per_round]
        p, g = timed(plain.step, chunk, dev.device), timed(backend_step, chunk, dev.device)
        ratios.append(g / p)
        print(f"  round {r}: plain PEFT {p:9.0f} tokens/s, backend {g:9.0f} tokens/s")
    dev.drop_adapter("speed")
    print(f"  training backend / plain PEFT, median of per-round ratios: "
          f"{statistics.median(ratios):.3f}")
    sampling(dev, model_dir, batches[0][0][:32])


def sampling(dev: TorchBackend, model_dir: Path, prompt: list[int]) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dev.dtype).to(dev.device)
    spec = SampleSpec(prompt=tuple(prompt), num_samples=8, max_tokens=64, temperature=1.0,
                      seed=0, stop_token_ids=())
    ids = torch.tensor([prompt], device=dev.device)

    def ours(_: object) -> None:
        dev.sample(None, spec)

    def theirs(_: object) -> None:
        hf.generate(ids, do_sample=True, num_return_sequences=8, max_new_tokens=64,
                    min_new_tokens=64, pad_token_id=0)

    for fn in (ours, theirs):  # warm-up
        fn(None)
    rounds = [[timed(fn, [[[0] * 513]], dev.device) for fn in (ours, theirs)]
              for _ in range(3)]
    ratio = statistics.median(a / b for a, b in rounds)
    print(f"  sampling 8 x 64 tokens, backend / HF generate (median of 3): {ratio:.3f}")


def across_runs(dev: TorchBackend, batches: list[list[list[int]]], rank: int,
                runs: int = 4) -> bool:
    """Jobs of `runs` runs in one pass against the same jobs one at a time: each job's loss
    and gradient agree, and the throughput ratio. True when they agree."""
    from engine.backend import Backend, TrainingPass

    before = dev.batch_across_runs
    dev.batch_across_runs = True
    names = [f"runs-{which}-{i}" for which in ("one", "alone") for i in range(runs)]
    for i, name in enumerate(names):
        dev.create_adapter(name, LoraSpec(rank=rank, seed=i % runs))

    def jobs(which: str, seqs: list[list[int]]) -> list[TrainingPass]:
        return [TrainingPass(f"runs-{which}-{i}", datums(seqs), "cross_entropy", {}, False)
                for i in range(runs)]

    together = dev.forward_backward_many(jobs("one", batches[0]))
    alone = Backend.forward_backward_many(dev, jobs("alone", batches[0]))
    worst_loss = max(abs(a.metrics["loss:sum"] / b.metrics["loss:sum"] - 1)  # type: ignore[union-attr]
                     for a, b in zip(together, alone, strict=True))
    worst_grad = max(_grad_gap(dev, f"runs-one-{i}", f"runs-alone-{i}") for i in range(runs))
    ok = worst_loss <= MAX_LOSS_REL_DIFF and worst_grad <= MAX_UPDATE_REL_DIFF
    print(f"  {runs} runs in one pass against each alone: loss rel. diff {worst_loss:.2e} "
          f"(max {MAX_LOSS_REL_DIFF}), gradient rel. diff {worst_grad:.2e} "
          f"(max {MAX_UPDATE_REL_DIFF}) {'ok' if ok else 'FAIL'}")
    ratios = []
    for seqs in batches[1:4]:
        one = timed(lambda s: dev.forward_backward_many(jobs("one", s)), [seqs], dev.device)
        each = timed(lambda s: Backend.forward_backward_many(dev, jobs("alone", s)), [seqs],
                     dev.device)
        ratios.append(one / each)
    print(f"  {runs} runs' jobs in one pass / one after the other, tokens/s (median of 3): "
          f"{statistics.median(ratios):.3f} ({dev.batched_passes} passes ran batched)")
    for name in names:
        dev.drop_adapter(name)
    dev.batch_across_runs = before
    return ok


def _grad_gap(dev: TorchBackend, a: str, b: str) -> float:
    """|g_a - g_b| / |g_b| over an adapter's accumulated gradient."""
    left, right = dev.adapter_snapshot(a), dev.adapter_snapshot(b)
    keys = [k for k in left if k.startswith("grad:")]
    diff = torch.stack([torch.linalg.vector_norm((left[k] - right[k]).float()) for k in keys])
    norm = torch.stack([torch.linalg.vector_norm(right[k].float()) for k in keys])
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(norm))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device is visible to torch (install a CUDA build of torch==2.13.0 on "
              "a GPU machine); --device cpu runs the script's self-check", file=sys.stderr)
        return 2
    registry = ModelRegistry(Path(args.data_dir))
    model_dir = registry.materialize(DEFAULT_BASE_MODEL)
    cpu = load_backend(registry, DEFAULT_BASE_MODEL, device="cpu")
    dev = load_backend(registry, DEFAULT_BASE_MODEL, device=args.device)
    batches = make_batches(model_dir, (args.rounds + 1) * args.steps + 1, args.batch,
                           args.seq_len)
    name = torch.cuda.get_device_name() if dev.device.type == "cuda" else "cpu"
    print(f"{DEFAULT_BASE_MODEL} on {name} ({dev.dtype}) against cpu (float32); rank "
          f"{args.rank}, batch {args.batch} x {args.seq_len}")
    print("correctness")
    ok = correctness(cpu, dev, batches[0], args.rank)
    del cpu
    print("throughput")
    throughput(dev, model_dir, batches[1:], args.rank, args.rounds)
    print("several runs in one pass")
    ok = across_runs(dev, batches[1:], args.rank) and ok
    print("PASS" if ok else "FAIL: the device disagrees with the CPU reference or with "
          "itself running each job alone")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
