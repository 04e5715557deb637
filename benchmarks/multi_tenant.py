"""Many tenants at once: aggregate throughput of concurrent SDK clients against one
`loragate serve`, side by side in one run, and where the time goes.

Training: 1, 2, 4 and 8 researchers (a key each) train concurrently, each its own rank-8
LoRA run on SmolLM2-135M-Instruct with B2 x T64 batches of new real text every step
(forward_backward + optim_step, as the SDK pipelines them). Reported: aggregate tokens/s
and its ratio to one researcher alone (target: 4 runs >= 1.5x).

Sampling: 8 samples x 64 tokens from one prompt through the gateway against HF
`generate` on the same model in this process (target >= 1.5x), and 4 concurrent sampling
clients against one (target >= 2x).

Where the time goes: for every training configuration, the futures table (`created_at`,
`claimed_at`, `finished_at`) splits each job into its wait in the queue and its run on the
worker; the worker's busy share of the wall time and the mean run time per job kind show
whether concurrency is lost in the model (jobs run slower), in the worker's
one-job-at-a-time loop (jobs queue behind each other) or around it (the worker idles).

    python -m benchmarks.multi_tenant [--tenants 1,2,4,8] [--steps 6] [--batch 2]
        [--seq-len 64] [--rank 8] [--samples 8] [--sample-tokens 64]

The gateway runs with the environment's settings: `LORAGATE_BATCH_ACROSS_RUNS=on` measures
jobs of several runs in one pass on CPU, where its default (`auto`) leaves it off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.train_throughput import LR, make_batches  # noqa: E402
from engine.host_memory import retain_freed_memory  # noqa: E402
from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry  # noqa: E402

REFUSED: list[str] = []  # screening refusals of benchmark batches (ordinary text)
PROMPT_TEXT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@contextlib.contextmanager
def gateway_process(data_dir: Path, tmp: str, owners: int) -> Iterator[tuple[str, list[str],
                                                                             Path]]:
    """`loragate serve` in a subprocess with its own SQLite file; yields (url, one key per
    owner, the database file)."""
    from gateway.embedded import serve_in_subprocess

    db = Path(tmp) / "bench.db"
    env = {**os.environ, "LORAGATE_DATABASE_URL": f"sqlite:///{db}"}
    keys = [subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--role",
                            "researcher", "--owner", f"tenant-{i}", "--data-dir",
                            str(data_dir)], env=env, check=True, text=True,
                           capture_output=True, cwd=ROOT).stdout.strip()
            for i in range(owners)]
    with serve_in_subprocess(data_dir, env=env, start_timeout=300) as url:
        yield url, keys, db


class Trainer:
    """One researcher: a ServiceClient and a LoRA training client of their own."""

    def __init__(self, url: str, key: str, rank: int) -> None:
        import tinker

        self.types = tinker.types
        self.service = tinker.ServiceClient(base_url=url, api_key=key)
        self.client = self.service.create_lora_training_client(
            base_model=DEFAULT_BASE_MODEL, rank=rank, seed=0).result()

    @property
    def run_id(self) -> str:
        return self.client.model_id

    def step(self, seqs: list[list[int]]) -> int:
        """One step; the tokens it trained (0 when screening refused the batch: ordinary
        text is sometimes flagged, and the refusal is part of the work measured)."""
        import tinker

        types = self.types
        data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                            loss_fn_inputs={"target_tokens": s[1:],
                                            "weights": [1.0] * (len(s) - 1)}) for s in seqs]
        try:
            fb = self.client.forward_backward(data, "cross_entropy")
            opt = self.client.optim_step(types.AdamParams(learning_rate=LR))
            fb.result()
            opt.result()
        except tinker.PermissionDeniedError as exc:
            if "screening" not in str(exc):
                raise
            REFUSED.append(str(exc))
            return 0
        return sum(len(s) - 1 for s in seqs)


def concurrent_training(trainers: list[Trainer], batches: list[list[list[list[int]]]]
                        ) -> tuple[float, float, float]:
    """Every trainer runs its own batches at once; (tokens/s, wall start, wall end) with the
    times as UNIX seconds (to match the futures table)."""
    barrier = threading.Barrier(len(trainers) + 1)
    errors: list[BaseException] = []
    trained = [0] * len(trainers)

    def work(i: int, own: list[list[list[int]]]) -> None:
        barrier.wait()
        try:
            for seqs in own:
                trained[i] += trainers[i].step(seqs)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, b)) for i, b in enumerate(batches)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.time()
    for thread in threads:
        thread.join()
    end = time.time()
    if errors:
        raise errors[0]
    return sum(trained) / (end - start), start, end


def where_the_time_goes(db: Path, run_ids: list[str], start: float, end: float
                        ) -> dict[str, float]:
    """From the futures of these runs created in [start, end]: the worker's busy share of
    the wall time, the mean queue wait and the mean run time per job kind (seconds)."""
    marks = ",".join("?" * len(run_ids))
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT kind, created_at, claimed_at, finished_at FROM futures WHERE model_id IN "
            f"({marks}) AND status = 'done'", run_ids).fetchall()
    runs: dict[str, list[float]] = defaultdict(list)
    waits, spans = [], []
    for kind, created, claimed, finished in rows:
        c, s, f = (_unix(v) for v in (created, claimed, finished))
        if c < start or c > end:
            continue
        runs[kind].append(f - s)
        waits.append(s - c)
        spans.append((s, f))
    summary = {"busy_share": _covered(spans) / (end - start),
               "queue_wait": statistics.mean(waits)}
    summary.update({f"run:{kind}": statistics.mean(times) for kind, times in runs.items()})
    return summary


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the spans (jobs that ran in one pass overlap)."""
    total, reach = 0.0, float("-inf")
    for begin, end in sorted(spans):
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def _unix(value: str) -> float:
    stamp = dt.datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def training(url: str, keys: list[str], db: Path, model_dir: Path, args: argparse.Namespace
             ) -> dict[int, tuple[float, dict[str, float]]]:
    counts = [int(n) for n in args.tenants.split(",")]
    needed = sum(counts) * (args.steps + 1)
    batches = iter(make_batches(model_dir, needed, args.batch, args.seq_len))
    results = {}
    for n in counts:
        trainers = [Trainer(url, keys[i], args.rank) for i in range(n)]
        concurrent_training(trainers, [[next(batches)] for _ in trainers])  # warm-up
        own = [[next(batches) for _ in range(args.steps)] for _ in trainers]
        tps, start, end = concurrent_training(trainers, own)
        results[n] = (tps, where_the_time_goes(db, [t.run_id for t in trainers], start, end))
        for trainer in trainers:
            trainer.service.close("success").result()
        print(f"  {n} run(s): {tps:7.1f} tokens/s  {results[n][1]}", flush=True)
    return results


class Sampler:
    def __init__(self, url: str, key: str, prompt: list[int]) -> None:
        import tinker

        self.types = tinker.types
        self.service = tinker.ServiceClient(base_url=url, api_key=key)
        self.client = self.service.create_sampling_client(base_model=DEFAULT_BASE_MODEL).result()
        self.prompt = self.types.ModelInput.from_ints(prompt)

    def sample(self, samples: int, tokens: int) -> int:
        params = self.types.SamplingParams(max_tokens=tokens, temperature=1.0, stop=[])
        out = self.client.sample(self.prompt, samples, params).result()
        return sum(len(seq.tokens) for seq in out.sequences)


def sampling(url: str, keys: list[str], model_dir: Path, args: argparse.Namespace
             ) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT_TEXT}],
                                         add_generation_prompt=True, tokenize=False)
    ids_list = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    samplers = [Sampler(url, keys[i], ids_list) for i in range(4)]
    samplers[0].sample(args.samples, args.sample_tokens)  # warm-up
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([ids_list])

    def hf() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, do_sample=True, num_return_sequences=args.samples,
                                 max_new_tokens=args.sample_tokens,
                                 min_new_tokens=args.sample_tokens, top_k=0)
        return (out.shape[0] * (out.shape[1] - ids.shape[1])) / (time.perf_counter() - started)

    def gateway(clients: list[Sampler]) -> float:
        counts = [0] * len(clients)

        def one(i: int) -> None:
            counts[i] = clients[i].sample(args.samples, args.sample_tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - started)

    hf()  # warm-up
    rounds: dict[str, list[float]] = {"hf": [], "one": [], "four": []}
    for _ in range(args.sample_rounds):  # alternating, so drift hits all three alike
        rounds["hf"].append(hf())
        rounds["one"].append(gateway(samplers[:1]))
        rounds["four"].append(gateway(samplers))
    for sampler in samplers:
        sampler.service.close("success").result()
    return {name: statistics.median(values) for name, values in rounds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sample-tokens", type=int, default=64)
    parser.add_argument("--sample-rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    # The gateway's processes keep freed memory (engine.host_memory); so does the in-process
    # baseline, so the ratio measures the gateway, not the allocator setting.
    retain_freed_memory()

    data_dir = Path(args.data_dir)
    model_dir = ModelRegistry(data_dir).materialize(DEFAULT_BASE_MODEL)
    owners = max(4, *(int(n) for n in args.tenants.split(",")))
    with tempfile.TemporaryDirectory() as tmp, gateway_process(data_dir, tmp, owners) as (
            url, keys, db):
        print("training", flush=True)
        trained = training(url, keys, db, model_dir, args)
        sampled = None
        if not args.skip_sampling:
            print("sampling", flush=True)
            sampled = sampling(url, keys, model_dir, args)

    print(f"\nmodel {DEFAULT_BASE_MODEL}, rank {args.rank}, batch {args.batch} x {args.seq_len} "
          f"tokens, {args.steps} steps per run, torch threads {torch.get_num_threads()}, cpu")
    one = trained[min(trained)][0]
    print(f"{'runs':>5} {'tokens/s':>9} {'vs 1':>6} {'busy':>6} {'wait s':>7}  run time per job")
    for n, (tps, split) in trained.items():
        jobs = ", ".join(f"{k[4:]} {v * 1000:.0f} ms" for k, v in split.items()
                         if k.startswith("run:"))
        print(f"{n:>5} {tps:9.1f} {tps / one:6.2f} {split['busy_share']:6.2f} "
              f"{split['queue_wait']:7.2f}  {jobs}")
    print("  (target: 4 runs >= 1.5x one run; busy = the worker's share of the wall time)")
    if REFUSED:
        print(f"{len(REFUSED)} batch(es) of ordinary text were refused by screening (not "
              f"counted as trained): {REFUSED[0][:200]}")
    if sampled is None:
        return 0
    print(f"sampling {args.samples} x {args.sample_tokens} tokens: HF generate "
          f"{sampled['hf']:.1f} tokens/s, gateway {sampled['one']:.1f} "
          f"({sampled['one'] / sampled['hf']:.2f}x HF, target >= 1.5x); 4 clients "
          f"{sampled['four']:.1f} ({sampled['four'] / sampled['one']:.2f}x one, target >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
