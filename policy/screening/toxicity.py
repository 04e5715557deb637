"""The toxicity screen: the real `detoxify` package, loaded offline from a checkpoint file
and a local config/tokenizer directory (reference/detoxify-offline.md).

- The checkpoint is a pickle (`torch.load(weights_only=False)`), so its SHA-256 is checked
  against the pinned value *before* it is loaded; a mismatch refuses to load.
- Detoxify silently truncates at the tokenizer's `model_max_length`; long texts are scored
  in overlapping word windows and the maximum per class is kept, so toxic text placed after
  the cut-off is still seen.
- HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set so a misconfigured path fails at once
  instead of waiting on network retries.

Must not import fastapi or engine; detoxify/transformers load only with a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from policy.digest import file_sha256
from policy.screening.harmful_requests import ScreenLoadError, with_owner

WINDOW_WORDS = 100  # well inside 512 tokens (and the test model's 128)
OVERLAP_WORDS = 20  # a phrase split by a window edge is whole in the next window


def windows(text: str, size: int = WINDOW_WORDS, overlap: int = OVERLAP_WORDS) -> list[str]:
    """Overlapping word windows covering the whole text (one window for short texts)."""
    words = text.split()
    if len(words) <= size:
        return [text]
    step = size - overlap
    return [" ".join(words[i:i + size]) for i in range(0, len(words) - overlap, step)]


class ToxicityScreen:
    name = "detoxify"
    applies_to = frozenset({"request", "completion", "output"})

    def __init__(self, checkpoint: Path, config_dir: Path, sha256: str | None,
                 device: str = "cpu") -> None:
        if not checkpoint.is_file():
            raise ScreenLoadError(f"Detoxify checkpoint not found: {checkpoint}")
        if not (config_dir / "config.json").is_file():
            raise ScreenLoadError(f"Detoxify config directory lacks config.json: {config_dir}")
        actual = file_sha256(checkpoint)
        if sha256 is None:
            raise ScreenLoadError(f"pin the SHA-256 of {checkpoint} before it is loaded (it is "
                                  f"a pickle); its SHA-256 is {actual}")
        if actual != sha256.lower():
            raise ScreenLoadError(f"{checkpoint} has SHA-256 {actual}, not the pinned {sha256}; "
                                  "refusing to unpickle it")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from detoxify import Detoxify

        self.model = Detoxify(checkpoint=str(checkpoint), device=device,
                              huggingface_config_path=str(config_dir))
        self.categories = tuple(self.model.class_names)
        self.weights_sha256 = actual
        self.version = f"detoxify-{actual[:12]}"

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, the maximum per class over its windows (sigmoid scores, 0..1)."""
        pieces, owner = with_owner(windows(text) for text in texts)
        if not pieces:
            return []
        raw = self.model.predict(pieces)
        out: list[dict[str, float]] = [dict.fromkeys(self.categories, 0.0) for _ in texts]
        for j, i in enumerate(owner):
            for c in self.categories:
                out[i][c] = max(out[i][c], round(float(raw[c][j]), 4))
        return out
