"""A training step with glibc's default allocator against one that keeps freed memory
(`engine.host_memory.retain_freed_memory`), side by side.

Each round runs the same steps — a plain PEFT forward_backward + AdamW step on
SmolLM2-135M-Instruct (rank-16 LoRA on every linear layer), real English text, new text each
step — in two fresh processes, one per allocator setting (the setting is process-wide and
cannot be undone), alternating so machine drift hits both. Prints each setting's median
seconds per step, kernel (system) seconds and page faults per step, and the ratio.

    python -m benchmarks.host_memory_bench [--rounds 2] [--steps 3] [--batch 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("default", "retained")


def child(mode: str, model_dir: Path, steps: int, batch: int, seq_len: int) -> dict:
    """Time `steps` steps (after one warm-up step) in this process under `mode`."""
    if mode == "retained":
        from engine.host_memory import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("this C library is not glibc: nothing to compare")
    from benchmarks.train_throughput import PlainPeft, make_batches

    batches = make_batches(model_dir, steps + 1, batch, seq_len)
    runner = PlainPeft(model_dir, rank=16)
    runner.step(batches[0])
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for seqs in batches[1:]:
        start = time.perf_counter()
        runner.step(seqs)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": statistics.median(times),
            "system_seconds": (after.ru_stime - before.ru_stime) / steps,
            "page_faults": (after.ru_minflt - before.ru_minflt) / steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.model_dir), args.steps, args.batch,
                               args.seq_len)))
        return 0

    from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry

    model_dir = ModelRegistry(Path(args.data_dir)).materialize(DEFAULT_BASE_MODEL)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.host_memory_bench", "--child", mode,
                 "--model-dir", str(model_dir), "--steps", str(args.steps),
                 "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                cwd=ROOT, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    print(f"\nB{args.batch}xT{args.seq_len} SmolLM2 training step (median of "
          f"{args.rounds} rounds x {args.steps} steps)")
    medians = {}
    for mode in MODES:
        medians[mode] = {key: statistics.median(row[key] for row in results[mode])
                         for key in results[mode][0]}
        m = medians[mode]
        print(f"  {mode:9s} {m['seconds']:7.2f} s/step  {m['system_seconds']:6.2f} s in the "
              f"kernel  {m['page_faults']:10,.0f} page faults")
    print(f"  speed-up retained/default: "
          f"{medians['default']['seconds'] / medians['retained']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
