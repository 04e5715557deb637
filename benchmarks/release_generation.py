"""The release gate's greedy generation, side by side in one run: `generate_greedy` (the
continuous-batching decoder) against Hugging Face `generate` on left-padded chunks of 16
prompts (the gate's previous path), on SmolLM2 with the refusal suite's prompts. Prints both
times, the ratio and how many replies are identical.

    python -m benchmarks.release_generation [--data-dir data/bench] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
import warnings

import torch

from engine.registry import DEFAULT_BASE_MODEL, ModelRegistry
from engine.torch_backend import TorchBackend, load_backend
from evals.probes import ModelView
from evals.suites import SUITES_DIR

CHUNK = 16


def hf_generate(backend: TorchBackend, prompts: list[list[int]], max_tokens: int
                ) -> list[list[int]]:
    """Greedy replies from HF `generate`, CHUNK left-padded prompts at a time, each cut
    after its first EOS."""
    eos = list(backend.info.eos_token_ids)
    replies = []
    with torch.inference_mode(), backend._activate(None) as model:
        for start in range(0, len(prompts), CHUNK):
            ids, mask = backend.padded(prompts[start:start + CHUNK], left=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
            for row in out[:, ids.shape[1]:].tolist():
                ends = [i + 1 for i, token in enumerate(row) if token in eos]
                replies.append(row[:ends[0]] if ends else row)
    return replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/bench",
                        help="where the base model is prepared (reused between runs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    backend = load_backend(ModelRegistry(args.data_dir), DEFAULT_BASE_MODEL, "cpu")
    view = ModelView(backend, None, max_new_tokens=args.max_tokens, seed=0)
    with open(SUITES_DIR / "refusal.toml", "rb") as fh:
        prompts = [view.chat(item["prompt"]) for item in tomllib.load(fh)["item"]]
    print(f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    for n in range(args.rounds):
        started = time.perf_counter()
        ours = backend.generate_greedy(None, prompts, args.max_tokens)
        middle = time.perf_counter()
        theirs = hf_generate(backend, prompts, args.max_tokens)
        ended = time.perf_counter()
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        print(f"round {n + 1}: generate_greedy {middle - started:.2f} s, HF generate "
              f"(chunks of {CHUNK}) {ended - middle:.2f} s: "
              f"{(ended - middle) / (middle - started):.2f}x; identical replies "
              f"{same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
