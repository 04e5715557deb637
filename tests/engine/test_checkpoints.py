"""Adapter checkpoints: round trips with and without optimizer state, adapter-only contents,
atomic writes and validated reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoints import ADAPTER_FILE, MANIFEST_FILE, OPTIMIZER_FILE
from engine.errors import UserInputError
from engine.torch_backend import TorchBackend
from engine.values import AdamStep, LoraSpec

from .conftest import ce_datum, train_step


def step_once(backend: TorchBackend, adapter: str, seed: int) -> None:
    data = [ce_datum(np.random.default_rng(seed), 11, backend.vocab_size)]
    backend.forward_backward(adapter, data, "cross_entropy", {}, False)
    backend.optim_step(adapter, AdamStep(learning_rate=0.01, weight_decay=0.1))


def assert_same_tensors(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_continuing_after_load_with_optimizer_equals_uninterrupted_training(
    backend, new_adapter, tmp_path
):
    adapter = new_adapter(seed=4)
    step_once(backend, adapter, 0)
    step_once(backend, adapter, 1)
    size = backend.save_adapter(adapter, tmp_path / "ckpt", with_optimizer=True)
    assert size == sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    restored = f"{adapter}-restored"
    spec = backend.load_adapter(restored, tmp_path / "ckpt", with_optimizer=True)
    try:
        assert spec == backend.adapter_spec(adapter)
        assert_same_tensors(backend.adapter_snapshot(adapter), backend.adapter_snapshot(restored))
        step_once(backend, adapter, 2)
        step_once(backend, restored, 2)
        assert_same_tensors(backend.adapter_tensors(adapter), backend.adapter_tensors(restored))
    finally:
        backend.drop_adapter(restored)


def test_load_without_optimizer_keeps_weights_and_starts_adam_fresh(backend, new_adapter, tmp_path):
    trained, fresh_adam = new_adapter(seed=4), new_adapter(seed=4)
    step_once(backend, trained, 0)
    backend.save_adapter(trained, tmp_path / "ckpt", with_optimizer=True)
    backend.load_adapter(fresh_adam, tmp_path / "ckpt", with_optimizer=False)  # replaces it
    snapshot = backend.adapter_snapshot(fresh_adam)
    assert not any(k.startswith(("exp_avg", "step")) for k in snapshot)
    assert_same_tensors(backend.adapter_tensors(trained), backend.adapter_tensors(fresh_adam))
    step_once(backend, trained, 1)
    step_once(backend, fresh_adam, 1)
    steps = {k: v for k, v in backend.adapter_snapshot(fresh_adam).items() if k[:5] == "step:"}
    assert steps and all(v.item() == 1 for v in steps.values())
    assert backend.adapter_snapshot(trained)[next(iter(steps))].item() == 2


def test_checkpoint_holds_only_lora_tensors_never_base_weights(
    backend, new_adapter, tmp_path, tiny_dir
):
    adapter = new_adapter(rank=2)
    train_step(backend, adapter)
    backend.save_adapter(adapter, tmp_path / "ckpt", with_optimizer=True)
    files = {f.name for f in (tmp_path / "ckpt").iterdir()}
    assert files == {ADAPTER_FILE, OPTIMIZER_FILE, MANIFEST_FILE}
    base_keys = set(load_file(str(tiny_dir / "model.safetensors")))
    for name in (ADAPTER_FILE, OPTIMIZER_FILE):
        keys = set(load_file(str(tmp_path / "ckpt" / name)))
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert not keys & base_keys
        assert all(backend.info.name not in k for k in keys)
    adapter_keys = load_file(str(tmp_path / "ckpt" / ADAPTER_FILE))
    assert all("test-adapter" not in k and ".lg" not in k for k in adapter_keys)  # no names
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["base_model"] == backend.info.name
    assert manifest["lora"] == LoraSpec(rank=2, seed=0).to_dict()
    assert manifest["lora_alpha"] == 32


def test_save_without_optimizer_writes_no_optimizer_file(backend, new_adapter, tmp_path):
    adapter = new_adapter()
    backend.save_adapter(adapter, tmp_path / "ckpt", with_optimizer=False)
    assert not (tmp_path / "ckpt" / OPTIMIZER_FILE).exists()
    with pytest.raises(UserInputError, match="without optimizer"):
        backend.load_adapter("x", tmp_path / "ckpt", with_optimizer=True)
    assert not backend.has_adapter("x")


def test_saving_again_replaces_the_directory_and_leaves_no_temp_files(
    backend, new_adapter, tmp_path
):
    adapter = new_adapter()
    backend.save_adapter(adapter, tmp_path / "ckpt", with_optimizer=True)
    train_step(backend, adapter)
    backend.save_adapter(adapter, tmp_path / "ckpt", with_optimizer=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert not (tmp_path / "ckpt" / OPTIMIZER_FILE).exists()
    saved = load_file(str(tmp_path / "ckpt" / ADAPTER_FILE))
    assert_same_tensors(saved, backend.adapter_tensors(adapter))


def test_corrupt_or_foreign_checkpoints_are_refused_and_the_old_adapter_survives(
    backend, new_adapter, tmp_path
):
    adapter = new_adapter(seed=1)
    train_step(backend, adapter)
    other = new_adapter(seed=2, rank=2)
    backend.save_adapter(other, tmp_path / "good", with_optimizer=True)
    before = backend.adapter_snapshot(adapter)

    def broken(name: str, edit) -> object:
        target = tmp_path / name
        target.mkdir()
        for f in (tmp_path / "good").iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        edit(target)
        return target

    def set_manifest(**changes):
        def edit(d):
            manifest = json.loads((d / MANIFEST_FILE).read_text())
            (d / MANIFEST_FILE).write_text(json.dumps({**manifest, **changes}))

        return edit

    def nan_tensor(d):
        tensors = load_file(str(d / ADAPTER_FILE))
        key = next(iter(tensors))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(d / ADAPTER_FILE))

    def drop_tensor(d):
        tensors = load_file(str(d / ADAPTER_FILE))
        tensors.pop(next(iter(tensors)))
        save_file(tensors, str(d / ADAPTER_FILE))

    cases = [
        broken("other-base", set_manifest(base_model="someone/else")),
        broken("version", set_manifest(format_version=99)),
        broken("rank", set_manifest(lora={**LoraSpec(rank=3).to_dict()})),
        broken("nan", nan_tensor),
        broken("missing", drop_tensor),
        broken("garbage", lambda d: (d / ADAPTER_FILE).write_bytes(b"not safetensors")),
        tmp_path / "does-not-exist",
    ]
    for directory in cases:
        with pytest.raises(UserInputError):
            backend.load_adapter(adapter, directory, with_optimizer=True)
        after = backend.adapter_snapshot(adapter)
        assert_same_tensors(before, after)
        assert backend.adapter_spec(adapter).rank == 4
