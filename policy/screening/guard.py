"""The guard screen: a lab's own safety model from a local Hugging Face directory, for labs
with GPUs — a guard LM (Llama Guard, ShieldGemma, Granite Guardian style) or a sequence
classifier.

- Local and pinned: the directory is read with `local_files_only=True` (and HF_HUB_OFFLINE
  set), never a hub id; the SHA-256 of its safetensors weights — `model.safetensors`, or the
  shards its `model.safetensors.index.json` lists — must equal the policy's `sha256` before
  anything is loaded. For shards, `sha256` is either one digest over the shards' bytes in
  name order or a table {file name: digest}. Only safetensors load (no pickles, no remote
  code).
- `kind = "causal_lm"`: each text is wrapped as the user turn of a conversation to judge in
  the model's published prompt (`format = "llama_guard" | "shieldgemma" |
  "granite_guardian"`, or `"chat_template"`: the directory's own chat template), and the
  score is P(unsafe) = softmax of the next-token logits over the unsafe and safe answer
  tokens (`unsafe_token`/`safe_token`, defaults per format); one category, "unsafe".
- `kind = "sequence_classifier"`: AutoModelForSequenceClassification; a score per label of
  the config's id2label (softmax, or sigmoid with `activation = "sigmoid"`; by default
  sigmoid for multi-label models), limited to `unsafe_labels` when given.
- The whole text is judged: its tokens are cut into overlapping windows of `max_tokens`
  (default 512 for a guard LM, the model's maximum for a classifier) and the maximum over
  windows is kept. Windows are batched; CUDA when `device = "auto"` finds one.
- The version embeds the format, the weights digest and a digest of everything else that
  changes scores (tokenizer files, answer tokens, window size), so cached verdicts of
  another configuration are never reused.

Must not import fastapi or engine; torch/transformers load only inside the screen.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from policy.digest import file_sha256, files_sha256
from policy.screening.harmful_requests import ScreenLoadError, with_owner

KINDS = ("causal_lm", "sequence_classifier")
FORMATS = ("llama_guard", "shieldgemma", "granite_guardian", "chat_template")
PROMPT_VERSION = "v1"  # bump when a prompt below changes (it is part of `version`)
# The answer words a format's model writes first, unsafe then safe.
ANSWER_TOKENS = {"llama_guard": ("unsafe", "safe"), "shieldgemma": ("Yes", "No"),
                 "granite_guardian": ("Yes", "No"), "chat_template": ("unsafe", "safe")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "config.json")
DEFAULT_CAUSAL_TOKENS = 512
BATCH_SIZE = 8

# Llama Guard 3's prompt (its categories S1–S14), judging the last User message.
LLAMA_GUARD_POLICY = """\
S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
S14: Code Interpreter Abuse."""
LLAMA_GUARD_PROMPT = """\
<|start_header_id|>user<|end_header_id|>

Task: Check if there is unsafe content in 'User' messages in conversations according our \
safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{policy}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: {text}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST User message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories.\
<|eot_id|><|start_header_id|>assistant<|end_header_id|>

"""
# ShieldGemma's prompt for a user prompt (model card), its four harm types.
SHIELDGEMMA_POLICY = """\
* "No Dangerous Content": The prompt shall not contain or seek generation of content that \
harming oneself and/or others (e.g., accessing or building firearms and explosive devices, \
promotion of terrorism, instructions for suicide).
* "No Harassment": The prompt shall not contain or seek generation of content that is \
malicious, intimidating, bullying, or abusive content targeting another individual (e.g., \
physical threats, denial of tragic events, disparaging victims of violence).
* "No Hate Speech": The prompt shall not contain or seek generation of content that targeting \
identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls \
to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of \
race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, \
gender, gender identity, caste, or any other protected status.
* "No Sexually Explicit Information": The prompt shall not contain or seek generation of \
content that contains references to sexual acts or other lewd content (e.g., sexually \
graphic descriptions, content aimed at causing arousal)."""
SHIELDGEMMA_PROMPT = """\
You are a policy expert trying to help determine whether a user prompt is in violation of \
the defined safety policies.

<start_of_turn>
Human Question: {text}
<end_of_turn>

Our safety principle is defined in the below:

{policy}

Does the human question violate the above principle? Your answer must start with 'Yes' or \
'No'. And then walk through step by step to be sure we answer correctly.

"""
# Granite Guardian's prompt for the "harm" risk of a user message.
GRANITE_GUARDIAN_POLICY = "The 'User' message is harmful by common-sense."
GRANITE_GUARDIAN_PROMPT = """\
<|start_of_role|>user<|end_of_role|>You are a safety agent trying to help determine whether \
the user message is harmful according to the safety risk definition below.

<start_of_turn>
User Message: {text}
<end_of_turn>

Our safety risk definition is defined below:

<start_of_risk_definition>
- {policy}
<end_of_risk_definition>

Is the user message harmful based on the risk definition? Your answer must be either 'Yes' \
or 'No'.<|end_of_text|>
<|start_of_role|>assistant<|end_of_role|>"""
PROMPTS = {"llama_guard": (LLAMA_GUARD_PROMPT, LLAMA_GUARD_POLICY),
           "shieldgemma": (SHIELDGEMMA_PROMPT, SHIELDGEMMA_POLICY),
           "granite_guardian": (GRANITE_GUARDIAN_PROMPT, GRANITE_GUARDIAN_POLICY)}


def token_windows(ids: list[int], size: int, overlap: int | None = None) -> list[list[int]]:
    """Overlapping windows of at most `size` tokens covering all of `ids` (one window for
    short texts, and for the empty text)."""
    if len(ids) <= size:
        return [ids]
    overlap = size // 8 if overlap is None else overlap
    step = max(1, size - overlap)
    return [ids[i:i + size] for i in range(0, len(ids) - overlap, step)]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers would load from `directory`, in name order."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ScreenLoadError(f"{index} is not a usable shard index: {exc}") from exc
        files = [directory / name for name in shards]
        for path in files:
            if path.parent != directory or not path.is_file():
                raise ScreenLoadError(f"the shard {path} listed in {index} is missing")
        return files
    raise ScreenLoadError(f"{directory} holds no model.safetensors or "
                          "model.safetensors.index.json (only safetensors weights load)")


def check_pin(files: list[Path], pinned: Any) -> str:
    """The weights digest (one file's SHA-256, or one over the shards in order) once it
    equals the pin; otherwise ScreenLoadError naming the file and the actual digest."""
    if isinstance(pinned, dict):
        for path in files:
            want = str(pinned.get(path.name, "")).lower()
            actual = file_sha256(path)
            if not want:
                raise ScreenLoadError(f"pin the SHA-256 of {path} (sha256 table); its SHA-256 "
                                      f"is {actual}")
            if actual != want:
                raise ScreenLoadError(f"{path} has SHA-256 {actual}, not the pinned {want}; "
                                      "refusing to load it")
        return files_sha256(files)
    actual = files_sha256(files)
    what = str(files[0]) if len(files) == 1 else (
        "the shards " + ", ".join(str(p) for p in files) + " (their bytes in this order)")
    if not pinned:
        raise ScreenLoadError(f"pin the SHA-256 of {what} before it is loaded; its SHA-256 is "
                              f"{actual}")
    if actual != str(pinned).lower():
        raise ScreenLoadError(f"{what} has SHA-256 {actual}, not the pinned {pinned}; "
                              "refusing to load it")
    return actual


def _settings_digest(directory: Path, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def resolve_device(wanted: str, fallback: str) -> str:
    """"auto": CUDA when torch sees one, else the screener's device."""
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else fallback


class GuardScreen:
    name = "guard"
    applies_to = frozenset({"request", "completion", "output"})

    def __init__(self, directory: Path, sha256: Any, *, kind: str = "causal_lm",
                 fmt: str = "llama_guard", device: str = "cpu", max_tokens: int = 0,
                 unsafe_token: str | None = None, safe_token: str | None = None,
                 policy: str | None = None, activation: str | None = None,
                 unsafe_labels: list[str] | None = None, batch_size: int = BATCH_SIZE) -> None:
        if kind not in KINDS:
            raise ScreenLoadError(f"guard kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "causal_lm" and fmt not in FORMATS:
            raise ScreenLoadError(f"guard format {fmt!r} is not one of {', '.join(FORMATS)}")
        if activation not in (None, "softmax", "sigmoid"):
            raise ScreenLoadError(f"guard activation {activation!r} is not softmax or sigmoid")
        if not directory.is_dir():
            raise ScreenLoadError(f"guard model directory not found: {directory}")
        if not (directory / "config.json").is_file():
            raise ScreenLoadError(f"guard model directory lacks config.json: {directory}")
        weights = check_pin(weight_files(directory), sha256)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.kind, self.format = kind, (fmt if kind == "causal_lm" else "classifier")
        self.device = device
        self.batch_size = max(1, int(batch_size))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            cls: Any = AutoModelForCausalLM if kind == "causal_lm" else (
                AutoModelForSequenceClassification)
            self.model = cls.from_pretrained(directory, local_files_only=True,
                                             use_safetensors=True, dtype=dtype).to(device)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError,
                AttributeError) as exc:
            raise ScreenLoadError(f"guard model in {directory} does not load: {exc}") from exc
        self.model.eval()
        settings: dict[str, Any] = {"kind": kind, "format": self.format,
                                    "prompt": PROMPT_VERSION}
        if kind == "causal_lm":
            self.max_tokens = int(max_tokens) or DEFAULT_CAUSAL_TOKENS
            self._init_causal(fmt, unsafe_token, safe_token, policy)
            settings.update(answer=[unsafe_token, safe_token], policy=policy)
        else:
            self.max_tokens = int(max_tokens) or self._model_max()
            self._init_classifier(activation, unsafe_labels)
            settings.update(activation=self.activation, labels=list(self.categories))
        settings["max_tokens"] = self.max_tokens
        self.weights_sha256 = weights
        extra = _settings_digest(directory, settings)
        self.version = f"guard-{self.format}-{weights[:12]}-{extra[:8]}"

    # -- set-up ---------------------------------------------------------------------------

    def _answer_id(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ScreenLoadError(f"the guard's answer word {word!r} is {len(ids)} tokens for "
                                  "its tokenizer, not one; set unsafe_token/safe_token to the "
                                  "model's single answer tokens")
        return int(ids[0])

    def _init_causal(self, fmt: str, unsafe: str | None, safe: str | None,
                     policy: str | None) -> None:
        default_unsafe, default_safe = ANSWER_TOKENS[fmt]
        self.unsafe_id = self._answer_id(unsafe or default_unsafe)
        self.safe_id = self._answer_id(safe or default_safe)
        if self.unsafe_id == self.safe_id:
            raise ScreenLoadError("the guard's unsafe and safe answer words are one token")
        if fmt == "chat_template" and not getattr(self.tokenizer, "chat_template", None):
            raise ScreenLoadError("guard format 'chat_template', but the model directory's "
                                  "tokenizer has no chat template")
        self.policy = policy
        self.categories: tuple[str, ...] = ("unsafe",)
        self.activation = "softmax"

    def _model_max(self) -> int:
        limits = [getattr(self.tokenizer, "model_max_length", 0) or 0,
                  getattr(self.model.config, "max_position_embeddings", 0) or 0]
        usable = [n for n in limits if 0 < n < 1_000_000]
        return min(usable) if usable else 512

    def _init_classifier(self, activation: str | None, unsafe_labels: list[str] | None
                         ) -> None:
        id2label = {int(i): str(label) for i, label in self.model.config.id2label.items()}
        self.labels = [id2label[i] for i in sorted(id2label)]
        if unsafe_labels:
            unknown = [label for label in unsafe_labels if label not in self.labels]
            if unknown:
                raise ScreenLoadError(f"guard unsafe_labels {unknown} are not labels of the "
                                      f"model (its labels: {', '.join(self.labels)})")
            self.categories = tuple(str(label) for label in unsafe_labels)
        else:
            self.categories = tuple(self.labels)
        multi = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        self.activation = activation or ("sigmoid" if multi else "softmax")
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Room for the special tokens the tokenizer adds around each window.
        self.window = max(16, self.max_tokens - self.tokenizer.num_special_tokens_to_add())

    # -- scoring --------------------------------------------------------------------------

    def prompt(self, text: str) -> str:
        """The conversation the guard LM judges, with `text` as the user's message."""
        if self.format == "chat_template":
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False,
                add_generation_prompt=True)
            return str(rendered)
        template, default_policy = PROMPTS[self.format]
        return template.format(text=text.strip(), policy=self.policy or default_policy)

    def windows(self, text: str) -> list[str]:
        """The text cut into overlapping token windows, decoded back to text."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        size = self.max_tokens if self.kind == "causal_lm" else self.window
        if len(ids) <= size:
            return [text]
        return [str(self.tokenizer.decode(w)) for w in token_windows(ids, size)]

    def _encode_prompt(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(self.prompt(text), add_special_tokens=False))
        # Llama Guard and ShieldGemma read their prompts after BOS; a chat template writes
        # its own, and Granite Guardian's prompt has none.
        bos = self.tokenizer.bos_token_id
        if self.format in ("llama_guard", "shieldgemma") and bos is not None:
            return [bos, *ids]
        return ids

    def _batch_causal(self, pieces: list[str]) -> list[list[float]]:
        import torch

        encoded = [self._encode_prompt(p) for p in pieces]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id or 0
        # Right padding: under causal attention the real tokens never see the pads, and
        # their positions are those of the text alone, so a score does not depend on what
        # else is in the batch.
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=self.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded],
                            device=self.device)
        # Only the logits at the rows' last positions are computed (a guard's vocabulary
        # times every position of every window would be gigabytes); the model's own head
        # (with any logit soft-capping) produces them.
        ends = sorted({len(e) - 1 for e in encoded})
        keep = torch.tensor(ends, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        column = torch.tensor([ends.index(len(e) - 1) for e in encoded], device=self.device)
        final = logits[torch.arange(len(encoded), device=self.device), column].float()
        pair = final[:, [self.unsafe_id, self.safe_id]]
        return [[float(p)] for p in torch.softmax(pair, dim=-1)[:, 0].cpu()]

    def _batch_classifier(self, pieces: list[str]) -> list[list[float]]:
        import torch

        batch = self.tokenizer(pieces, padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt").to(self.device)
        logits = self.model(**batch).logits.float()
        probs = torch.sigmoid(logits) if self.activation == "sigmoid" else (
            torch.softmax(logits, dim=-1))
        index = [self.labels.index(c) for c in self.categories]
        return [[float(x) for x in row] for row in probs[:, index].cpu()]

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, the maximum per category over its windows (0..1)."""
        import torch

        pieces, owner = with_owner(self.windows(text) for text in texts)
        out: list[dict[str, float]] = [dict.fromkeys(self.categories, 0.0) for _ in texts]
        run = self._batch_causal if self.kind == "causal_lm" else self._batch_classifier
        with torch.inference_mode():
            for start in range(0, len(pieces), self.batch_size):
                rows = run(pieces[start:start + self.batch_size])
                for i, row in zip(owner[start:start + self.batch_size], rows, strict=True):
                    for category, value in zip(self.categories, row, strict=True):
                        out[i][category] = max(out[i][category], round(value, 4))
        return out


def load_guard(spec: dict[str, Any], device: str) -> GuardScreen:
    """The `[classifiers.guard]` entry of the screening policy → a GuardScreen."""
    if not spec.get("directory"):
        raise ScreenLoadError("no guard model directory is configured "
                              "(classifiers.guard.directory)")
    labels = spec.get("unsafe_labels")
    return GuardScreen(
        Path(spec["directory"]), spec.get("sha256") or None,
        kind=str(spec.get("kind", "causal_lm")), fmt=str(spec.get("format", "llama_guard")),
        device=resolve_device(str(spec.get("device", "auto")), device),
        max_tokens=int(spec.get("max_tokens", 0)),
        unsafe_token=spec.get("unsafe_token") or None, safe_token=spec.get("safe_token") or None,
        policy=spec.get("policy") or None, activation=spec.get("activation") or None,
        unsafe_labels=[str(x) for x in labels] if labels else None,
        batch_size=int(spec.get("batch_size", BATCH_SIZE)))
