"""The queued job payloads: what the gateway writes into a future row and the worker
reads back. One dataclass per kind of job, serialized as JSON (forward_backward keeps its
protobuf body as-is).

Owns only the shape of jobs; must not import torch, fastapi or the database.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from engine.values import AdamStep, LoraSpec

T = TypeVar("T")

# The kinds of job the engine runs itself (engine.worker); whoever builds a worker may add
# its own (the release evaluations).
ENGINE_JOB_KINDS = ("create_model", "load_weights_new", "load_weights", "forward_backward",
                    "optim_step", "save_weights", "save_weights_for_sampler", "sample")


@dataclasses.dataclass
class CreateAdapterJob:
    model_id: str
    base_model: str
    lora: LoraSpec


@dataclasses.dataclass
class LoadAdapterJob:
    """Load a saved checkpoint into `model_id`: into a new training run (`creates_run`)
    or replacing the weights of an existing one."""

    model_id: str
    base_model: str
    source_path: str
    storage_dir: str
    with_optimizer: bool
    creates_run: bool


@dataclasses.dataclass
class OptimStepJob:
    model_id: str
    step: AdamStep


@dataclasses.dataclass
class SaveAdapterJob:
    """Save the adapter as checkpoint `kind/name`. For the unnamed sampler snapshot of
    save_weights_and_get_sampling_client, `sampler_id` names the sampler to create."""

    model_id: str
    kind: str
    name: str
    tinker_path: str
    storage_dir: str
    with_optimizer: bool
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    sampler_id: str | None = None
    session_id: str | None = None
    # save_weights_external: the age recipients its downloads are encrypted to.
    age_recipients: list[str] | None = None


@dataclasses.dataclass
class SampleJob:
    """Sample from a sampler: the base model alone (`adapter_dir` None) or base + the
    checkpoint stored at `adapter_dir`. `request` is the validated /asample body."""

    sampler_id: str
    base_model: str
    adapter_dir: str | None
    request: dict[str, Any]


_NESTED = {"lora": LoraSpec, "step": AdamStep}


def dump_job(job: Any) -> bytes:
    return json.dumps(dataclasses.asdict(job), sort_keys=True).encode()


def load_job(cls: type[T], payload: bytes) -> T:
    raw = json.loads(payload)
    for key, nested in _NESTED.items():
        if key in raw:
            raw[key] = nested(**raw[key])
    return cls(**raw)
