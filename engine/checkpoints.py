"""Adapter checkpoint files: layout, atomic writing and validated reading.

Owns the on-disk format of one adapter checkpoint directory:

- `adapter.safetensors`: the adapter's LoRA tensors only, keyed like PEFT's own adapter files
  (no adapter name in the key, so they load into any adapter name);
- `optimizer.safetensors` (optional): AdamW `exp_avg`, `exp_avg_sq` and `step` per tensor key;
- `adapter.json`: format version, base model name, LoraSpec and LoRA hyper-parameters.

Must never write base-model weights, and must never leave a half-written directory behind
(everything is written to a temp sibling and renamed into place). Knows nothing of PEFT modules
or the backend's adapter bookkeeping: it moves dicts of CPU tensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import UserInputError
from engine.values import LoraSpec

FORMAT_NAME = "loragate-lora-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "adapter.json"
OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class AdapterFiles:
    """What one adapter checkpoint directory holds, as CPU tensors."""

    spec: LoraSpec
    base_model: str
    lora_alpha: float
    adapter: dict[str, torch.Tensor]
    # key -> {"exp_avg", "exp_avg_sq", "step"}; None when saved or loaded without optimizer.
    optimizer: dict[str, dict[str, torch.Tensor]] | None


def write_checkpoint(directory: Path, checkpoint: AdapterFiles) -> int:
    """Write `checkpoint` to `directory` (replacing it if present). Returns bytes written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        _write_files(tmp, checkpoint)
        written = sum(path.stat().st_size for path in tmp.iterdir())
        _replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def read_checkpoint(directory: Path, with_optimizer: bool) -> AdapterFiles:
    """Read and validate a checkpoint directory; any defect is a UserInputError."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    spec = _spec_from_manifest(manifest)
    adapter = _load_tensors(directory / ADAPTER_FILE)
    optimizer = None
    if with_optimizer:
        if not manifest.get("has_optimizer") or not (directory / OPTIMIZER_FILE).is_file():
            raise UserInputError(f"checkpoint {directory.name!r} was saved without optimizer state")
        optimizer = _unflatten_optimizer(_load_tensors(directory / OPTIMIZER_FILE), adapter)
    return AdapterFiles(
        spec=spec,
        base_model=str(manifest.get("base_model", "")),
        lora_alpha=float(manifest.get("lora_alpha", 0.0)),
        adapter=adapter,
        optimizer=optimizer,
    )


def _write_files(tmp: Path, checkpoint: AdapterFiles) -> None:
    save_file(_contiguous(checkpoint.adapter), str(tmp / ADAPTER_FILE))
    if checkpoint.optimizer is not None:
        flat = {
            f"{key}.{name}": tensor
            for key, state in checkpoint.optimizer.items()
            for name, tensor in state.items()
        }
        save_file(_contiguous(flat), str(tmp / OPTIMIZER_FILE))
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": checkpoint.base_model,
        "lora": checkpoint.spec.to_dict(),
        "lora_alpha": checkpoint.lora_alpha,
        "has_optimizer": checkpoint.optimizer is not None,
        "tensors": sorted(checkpoint.adapter),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in tmp.iterdir():
        _fsync(path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first and removed after,
    so at every moment the name holds either the complete old or the complete new files."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise UserInputError(
            f"{directory.name!r} is not an adapter checkpoint (no {MANIFEST_FILE})"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"checkpoint manifest {MANIFEST_FILE} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserInputError(f"{directory.name!r} is not a {FORMAT_NAME} checkpoint")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserInputError(
            f"checkpoint format version {manifest.get('format_version')!r} is not supported "
            f"(this server reads version {FORMAT_VERSION})"
        )
    return manifest


def _spec_from_manifest(manifest: dict[str, Any]) -> LoraSpec:
    lora = manifest.get("lora")
    if not isinstance(lora, dict):
        raise UserInputError("checkpoint manifest has no LoRA spec")
    try:
        return LoraSpec(
            rank=int(lora["rank"]),
            seed=None if lora.get("seed") is None else int(lora["seed"]),
            train_mlp=bool(lora.get("train_mlp", True)),
            train_attn=bool(lora.get("train_attn", True)),
            train_unembed=bool(lora.get("train_unembed", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"checkpoint manifest has an invalid LoRA spec: {exc}") from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserInputError(f"checkpoint file {path.name} is missing")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise UserInputError(f"checkpoint file {path.name} is corrupt: {exc}") from exc
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"checkpoint tensor {key!r} in {path.name} is not finite floats")
    return tensors


def _unflatten_optimizer(
    flat: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Group `<key>.<state>` tensors per adapter key; keys never stepped have no state."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for flat_key, tensor in flat.items():
        key, _, name = flat_key.rpartition(".")
        if key not in adapter or name not in OPTIMIZER_STATE_KEYS:
            raise UserInputError(f"optimizer state has an unexpected tensor {flat_key!r}")
        grouped.setdefault(key, {})[name] = tensor
    for key, state in grouped.items():
        if set(state) != set(OPTIMIZER_STATE_KEYS):
            raise UserInputError(f"optimizer state for {key!r} is incomplete")
        shape = adapter[key].shape
        if state["exp_avg"].shape != shape or state["exp_avg_sq"].shape != shape:
            raise UserInputError(f"optimizer state for {key!r} has the wrong shape")
        if state["step"].numel() != 1 or not math.isfinite(float(state["step"])):
            raise UserInputError(f"optimizer step count for {key!r} is invalid")
    return grouped
