"""Fixtures for the engine tests: the tiny model, one shared TorchBackend, adapters that clean
up after themselves, and an independent LoRA reference (plain HF model + hand-written LoRA
forward hooks, no PEFT) that the backend's numbers are checked against."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.registry import TINY_TEST_MODEL, ModelRegistry
from engine.torch_backend import LORA_ALPHA, TorchBackend, load_backend
from engine.values import AdamStep, LoraSpec, TrainingDatum

_ids = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model's matmuls are too small to gain from threads, and on a shared 2-core
    machine OpenMP spin-waiting against another busy process made this suite ~25x slower
    (205 s instead of 8 s). Restored after each module so other packages are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_registry(models_dir: Path) -> ModelRegistry:
    return ModelRegistry(models_dir)


@pytest.fixture(scope="session")
def tiny_dir(tiny_registry: ModelRegistry) -> Path:
    return tiny_registry.materialize(TINY_TEST_MODEL)


@pytest.fixture(scope="session")
def backend(tiny_registry: ModelRegistry) -> TorchBackend:
    """One backend for the whole session; tests use unique adapter ids and drop them."""
    return load_backend(tiny_registry, TINY_TEST_MODEL, device="cpu")


@pytest.fixture
def new_adapter(backend: TorchBackend) -> Iterator[Callable[..., str]]:
    """Factory: create an adapter with a unique id on the shared backend; dropped afterwards."""
    created: list[str] = []

    def make(rank: int = 4, seed: int | None = 0, **flags: bool) -> str:
        adapter_id = f"test-adapter-{next(_ids)}"
        backend.create_adapter(adapter_id, LoraSpec(rank=rank, seed=seed, **flags))
        created.append(adapter_id)
        return adapter_id

    yield make
    for adapter_id in created:
        backend.drop_adapter(adapter_id)


def random_tokens(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(3, vocab, size=n, dtype=np.int64)  # skip the special tokens


def ce_datum(rng: np.random.Generator, n: int, vocab: int) -> TrainingDatum:
    """A cross-entropy datum built the way clients do: model_input = s[:-1], targets = s[1:]."""
    seq = random_tokens(rng, n + 1, vocab)
    weights = (rng.random(n) < 0.7).astype(np.float32)
    return TrainingDatum(seq[:-1], {"target_tokens": seq[1:], "weights": weights})


def train_step(backend: TorchBackend, adapter_id: str, seed: int = 0, lr: float = 0.05) -> None:
    """One cross-entropy step with a large learning rate, so LoRA B is no longer zero."""
    rng = np.random.default_rng(seed)
    data = [ce_datum(rng, 12, backend.vocab_size), ce_datum(rng, 7, backend.vocab_size)]
    backend.forward_backward(adapter_id, data, "cross_entropy", {}, forward_only=False)
    backend.optim_step(adapter_id, AdamStep(learning_rate=lr))


class ReferenceLora:
    """The tiny model run by plain transformers, with LoRA added by forward hooks written here
    from the LoRA formula y = W x + (alpha / r) · B A x. Shares no code with PEFT."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def lora(self, tensors: dict[str, torch.Tensor] | None, rank: int) -> Iterator[None]:
        handles = []
        for module_path, (a, b) in _lora_pairs(tensors or {}).items():
            module = self.model.get_submodule(module_path)
            handles.append(module.register_forward_hook(_lora_hook(a, b, LORA_ALPHA / rank)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def logits(self, tokens: list[int] | np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).unsqueeze(0)
        return self.model(input_ids=ids).logits[0].float()

    def target_logprobs(self, tokens: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        logp = torch.log_softmax(self.logits(tokens), dim=-1)
        return logp.gather(-1, torch.as_tensor(targets).unsqueeze(-1)).squeeze(-1)


def _lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT-style keys `base_model.model.<module>.lora_A.weight` → {module: (A, B)}."""
    pairs = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        pairs[module] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float):
    def hook(module, inputs, output):
        return output + scale * (inputs[0] @ a.T @ b.T)

    return hook


@pytest.fixture(scope="session")
def reference(tiny_dir: Path) -> ReferenceLora:
    return ReferenceLora(tiny_dir)


def add_owner(factory, runs: Sequence[str] = ()) -> None:
    """Principal p1 with client session s1 and these active training runs on the tiny model
    (the rows a worker test's futures point at)."""
    from audit.db import transaction
    from audit.models import ClientSession, Principal, TrainingRun

    with transaction(factory) as session:
        session.add(Principal(id="p1", name="alice", role="researcher"))
        session.flush()
        session.add(ClientSession(id="s1", principal_id="p1"))
        session.flush()
        for n, run in enumerate(runs):
            session.add(TrainingRun(id=run, session_id="s1", model_seq_id=n, principal_id="p1",
                                    base_model=TINY_TEST_MODEL, lora_rank=4, lora_config="{}",
                                    status="active"))
