"""The model registry: deterministic tiny model, cached and atomic materialization, ModelInfo,
local sources, and clear errors for unknown names."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import time
from pathlib import Path

import pytest

import engine.registry as registry_module
from engine.errors import UnknownModelError
from engine.registry import DEFAULT_BASE_MODEL, TINY_TEST_MODEL, ModelRegistry


def digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_tiny_model_builds_fast_and_byte_identical(tiny_dir, tmp_path):
    started = time.perf_counter()
    again = ModelRegistry(tmp_path).materialize(TINY_TEST_MODEL)
    assert time.perf_counter() - started < 30  # generous: builds take ~1 s once imports are warm
    assert digests(again) == digests(tiny_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(digests(again))


def test_materialize_reuses_the_cache(tiny_registry, tiny_dir, monkeypatch):
    def fail(out: Path) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(registry_module, "build_tiny_llama", fail)
    assert tiny_registry.materialize(TINY_TEST_MODEL) == tiny_dir


def test_a_crashed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("power cut")

    monkeypatch.setattr(registry_module, "build_tiny_llama", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        ModelRegistry(tmp_path).materialize(TINY_TEST_MODEL)
    assert list((tmp_path / "models").iterdir()) == []


def test_tiny_model_info_and_tokenizer(tiny_registry, tiny_dir):
    from transformers import AutoTokenizer

    info = tiny_registry.info(TINY_TEST_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_dir)
    assert info.name == TINY_TEST_MODEL and info.arch == "llama"
    assert info.vocab_size == len(tokenizer) and 256 < info.vocab_size <= 512
    assert info.max_context == 512
    assert info.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert Path(info.tokenizer_dir) == tiny_dir.resolve()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert tokenizer.decode(ids) == "The quick brown fox"


def test_unknown_name_error_lists_the_known_names(tmp_path):
    registry = ModelRegistry(tmp_path, extra={"mine": "/nowhere/model"})
    assert not registry.is_known("gpt-17")
    with pytest.raises(UnknownModelError) as info:
        registry.materialize("gpt-17")
    for name in (DEFAULT_BASE_MODEL, TINY_TEST_MODEL, "mine"):
        assert name in str(info.value)
    with pytest.raises(UnknownModelError):
        registry.info("gpt-17")


def test_extra_names_and_absolute_paths_point_at_hf_directories(tiny_dir, tmp_path):
    registry = ModelRegistry(tmp_path, extra={"local/tiny": str(tiny_dir)})
    assert registry.names() == [DEFAULT_BASE_MODEL, TINY_TEST_MODEL, "local/tiny"]
    assert registry.is_known("local/tiny") and registry.is_known(str(tiny_dir))
    assert registry.materialize("local/tiny") == tiny_dir
    assert registry.materialize(str(tiny_dir)) == tiny_dir
    info = registry.info(str(tiny_dir))
    assert info.name == str(tiny_dir) and info.vocab_size > 0


def test_extra_name_with_a_bad_path_is_an_unknown_model(tmp_path):
    registry = ModelRegistry(tmp_path, extra={"broken": str(tmp_path / "missing")})
    with pytest.raises(UnknownModelError, match="broken"):
        registry.materialize("broken")
    relative = ModelRegistry(tmp_path, extra={"rel": "models/x"})
    with pytest.raises(UnknownModelError, match="not absolute"):
        relative.materialize("rel")


def test_missing_smollm2_package_says_how_to_install_it(tmp_path, monkeypatch):
    def no_files(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "files", no_files)
    with pytest.raises(UnknownModelError, match=re.escape(registry_module.SMOLLM2_INSTALL_HINT)):
        ModelRegistry(tmp_path).materialize(DEFAULT_BASE_MODEL)


def test_registry_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, engine.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_smollm2_materializes_from_the_gguf_as_an_equivalent_hf_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = ModelRegistry(tmp_path)
    model_dir = registry.materialize(DEFAULT_BASE_MODEL)
    info = registry.info(DEFAULT_BASE_MODEL)
    assert (info.arch, info.vocab_size, info.max_context) == ("llama", 49152, 8192)
    assert info.eos_token_ids == (2,)
    assert "quantization_config" not in (model_dir / "config.json").read_text()

    gguf = registry_module.locate_smollm2_gguf()
    original_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cached_tok = AutoTokenizer.from_pretrained(info.tokenizer_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = cached_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user" in chat and chat.endswith("<|im_start|>assistant\n")
    ids = cached_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert (
        ids == original_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )

    original = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cached = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(original(batch).logits, cached(batch).logits)
    assert registry.materialize(DEFAULT_BASE_MODEL) == model_dir  # cached from now on
