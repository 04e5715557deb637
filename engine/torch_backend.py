"""The torch + PEFT implementation of `engine.backend.Backend`.

Owns one base model in memory (frozen, eval mode, never modified) and any number of LoRA
adapters on it (one PEFT adapter per training run), each with its own gradient accumulator and
AdamW state; runs the Tinker losses, optimizer steps, adapter checkpoints and KV-cache sampling.

Its requests are the validated value objects of engine.values; the one input check left here
is `guard` (ids inside the embedding table, sequences inside the context), which every path
into the model runs first. Computation goes into private buffers, so a request that fails
(ids that do not fit, a non-finite loss, gradient or update) changes no adapter,
accumulator, optimizer state or base weight. Must not know about HTTP, the database, policy
or screening.

Choices the Tinker reference leaves to the server:
- LoRA scaling: lora_alpha = 32 for every rank (scale 32/rank, as in Thinking Machines'
  "LoRA Without Regret"), dropout 0; A ~ kaiming-uniform from the spec's seed, B = 0.
- cross_entropy without `weights` means all-ones weights.
- dro's beta defaults to 0.05 (`LOSS_CONFIG_DEFAULTS`).
- optim_step always applies one AdamW step with the accumulator, which is all zeros when no
  forward_backward ran since the last step (moments decay; weight decay still applies).
- Stop strings: matched against the decoded text of the generated tokens (special tokens kept);
  generation stops right after the token that completed the first match, and that token stays in
  `tokens`. `stop_strings` or `stop_token_ids` given (even empty) replaces the EOS default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import secrets
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.backend import Backend, ForwardBackwardResult, SampleResult, TrainingPass
from engine.checkpoints import AdapterFiles, read_checkpoint, write_checkpoint
from engine.decoding import BatchDecoder, topk_rows
from engine.errors import NonFiniteError, UnknownAdapterError, UserInputError
from engine.host_memory import retain_freed_memory
from engine.losses import check_gradient_screened, elementwise_loss
from engine.registry import ModelRegistry
from engine.values import (
    LOSS_CONFIG_DEFAULTS,
    AdamStep,
    LoraSpec,
    ModelInfo,
    SampleSpec,
    TrainingDatum,
    check_ids_fit,
    check_length_fits,
)

LORA_ALPHA = 32.0
DEFAULT_MAX_BATCH_TOKENS = 4096
SET_ROWS = 64  # continuations (of several prompts) scored in one pass: 1.65x per-prompt
# passes on SmolLM2 on 2 cores (32 rows: 1.5x, 128: 1.6x)
# (prompt, answer) pairs scored per pass: on a 2-core CPU 8 beat 16 by 5-10% and 32 by 30%
# (the padded attention and the logits grow faster than the useful work).
ANSWER_BATCH = 8


@dataclass
class _Adapter:
    """One trainable adapter: its PEFT name, parameters keyed without that name, a private
    fp32 gradient accumulator and its own AdamW."""

    spec: LoraSpec
    peft_name: str
    params: dict[str, torch.nn.Parameter]
    grads: dict[str, torch.Tensor]
    optimizer: torch.optim.AdamW


@dataclass
class _Job:
    """A forward_backward job made ready: its resolved loss config, the adapter it trains
    (None: forward only) and its datums on the device."""

    job: TrainingPass
    config: dict[str, float]
    adapter: _Adapter | None
    batch: list[_Datum]

    @property
    def trains(self) -> _Adapter | None:
        return None if self.job.forward_only else self.adapter


@dataclass
class _Losses:
    """The losses of some datums of one job from their logprobs, whether they are finite,
    and (for a job that trains, in a pass over several jobs) its gradients."""

    trains: _Adapter | None
    logps: list[torch.Tensor]
    losses: list[torch.Tensor]
    total: torch.Tensor
    error: UserInputError | None = None
    grads: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, loss_fn: str, config: dict[str, float], batch: list[_Datum],
           logps: list[torch.Tensor], trains: _Adapter | None) -> _Losses:
        losses = [elementwise_loss(loss_fn, logp, datum.inputs, config)
                  for logp, datum in zip(logps, batch, strict=True)]
        total = torch.stack([loss.sum() for loss in losses]).sum()
        part = cls(trains, logps, losses, total)
        if not bool(torch.isfinite(total)) or not all(
                bool(torch.isfinite(logp).all()) for logp in logps):
            part.error = NonFiniteError(
                f"the {loss_fn} loss or the model's logprobs are not finite")
        elif trains is not None:
            try:  # nothing trains that screening did not read as trained
                for logp, datum in zip(logps, batch, strict=True):
                    check_gradient_screened(loss_fn, logp, datum.inputs, config)
            except UserInputError as exc:
                part.error = exc
        return part

    def outputs(self) -> list[dict[str, np.ndarray]]:
        return [{"logprobs": logp.detach().float().cpu().numpy(),
                 "elementwise_loss": loss.detach().float().cpu().numpy()}
                for logp, loss in zip(self.logps, self.losses, strict=True)]

    def result(self) -> ForwardBackwardResult | UserInputError:
        """Commit this job's gradients (when it trains) and give its result."""
        if self.error is None and self.grads is not None and self.trains is not None:
            try:
                _commit_grads(self.trains, self.grads)
            except NonFiniteError as exc:
                self.error = exc
        if self.error is not None:
            return self.error
        return ForwardBackwardResult(outputs=self.outputs(),
                                     metrics={"loss:sum": float(self.total.detach().double())})


@dataclass
class _Datum:
    """A validated datum as tensors on the model device."""

    tokens: torch.Tensor
    targets: torch.Tensor
    inputs: dict[str, torch.Tensor]


def load_backend(registry: ModelRegistry, name: str, device: str | None = None) -> TorchBackend:
    """Materialize `name` through the registry and load it into a TorchBackend."""
    return TorchBackend(registry.materialize(name), registry.info(name), device=device)


class TorchBackend(Backend):
    """One frozen base model plus many PEFT LoRA adapters; see the module docstring."""

    keeps_durable_state = True

    def __init__(
        self,
        model_dir: Path,
        info: ModelInfo,
        device: str | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        retain_freed_memory()  # each step's gigabytes of tensors reuse the last step's memory
        self.info = info
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves memory on accelerators; CPUs get fp32 (bf16 matmuls are slow there).
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.max_batch_tokens = max_batch_tokens
        base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        base.to(self.device)
        base.eval().requires_grad_(False)
        self._base = base
        self._peft: Any = None  # PeftModel wrapping self._base while any adapter exists
        self._active_peft: str | None = None  # the PEFT adapter set active, if known
        self._lora_cache: list[Any] | None = None  # _lora_layers(), while adapters stay
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = int(base.get_output_embeddings().weight.shape[0])
        # The model as loaded: the guard checks ids against the embedding table itself.
        self._held = dataclasses.replace(info, vocab_size=min(info.vocab_size, self.vocab_size))
        self._adapters: dict[str, _Adapter] = {}
        self._names = itertools.count()
        self._lock = threading.RLock()
        # Jobs of different runs share one forward/backward pass (forward_backward_many) on
        # accelerators, where a small batch leaves most of the device idle. On CPU it gains
        # nothing (measured on 2 cores: 4 runs' B2xT64 jobs in one pass 0.9-1.0x running
        # them one after the other; one B8 pass is only 1.1x four B2 passes), so it is off.
        self.batch_across_runs = self.device.type == "cuda"
        self.batched_passes = 0  # forward_backward_many calls that ran as one pass

    # -- adapters ----------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> None:
        with self._lock:
            _check_adapter_id(adapter_id)
            if adapter_id in self._adapters:
                raise UserInputError(f"adapter {adapter_id!r} is already loaded")
            self._check_spec(spec)
            self._adapters[adapter_id] = self._new_adapter(spec)

    def has_adapter(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters

    def drop_adapter(self, adapter_id: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(adapter_id, None)
            if adapter is not None:
                self._remove_peft_adapter(adapter.peft_name)

    def adapter_spec(self, adapter_id: str) -> LoraSpec:
        with self._lock:
            return self._get(adapter_id).spec

    def adapter_tensors(self, adapter_id: str) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the adapter's LoRA tensors (for tests and exports)."""
        with self._lock:
            return {k: p.detach().cpu().clone() for k, p in self._get(adapter_id).params.items()}

    def adapter_snapshot(self, adapter_id: str) -> dict[str, torch.Tensor]:
        """CPU copies of everything an adapter's numbers consist of: weights, accumulated
        gradients and AdamW state, keyed `weight:`/`grad:`/`<state>:` + tensor key. Lets
        tests assert that a failed or foreign request changed nothing, bit for bit."""
        with self._lock:
            adapter = self._get(adapter_id)
            snapshot = {}
            for key, param in adapter.params.items():
                snapshot[f"weight:{key}"] = param.detach().cpu().clone()
                snapshot[f"grad:{key}"] = adapter.grads[key].detach().cpu().clone()
                for name, value in adapter.optimizer.state.get(param, {}).items():
                    snapshot[f"{name}:{key}"] = torch.as_tensor(value).detach().cpu().clone()
            return snapshot

    def _get(self, adapter_id: str) -> _Adapter:
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not loaded")
        return adapter

    def _check_spec(self, spec: LoraSpec) -> None:
        """The model's bound on a (valid, engine.values) LoRA rank."""
        hidden = int(self._base.config.hidden_size)
        if spec.rank > hidden:
            raise UserInputError(f"LoRA rank must be between 1 and {hidden}, got {spec.rank}")

    def _new_adapter(self, spec: LoraSpec) -> _Adapter:
        from peft import LoraConfig

        targets = spec.target_modules()
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=LORA_ALPHA,  # type: ignore[arg-type]
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
            init_lora_weights=False,  # we initialise from our own generator below
        )
        peft_name = f"lg{next(self._names)}"
        self._inject(peft_name, config)
        try:
            params = self._peft_params(peft_name)
            if not params:
                raise UserInputError(f"this model has none of the modules {targets}")
            _init_lora(params, spec.seed if spec.seed is not None else secrets.randbits(63))
        except BaseException:
            self._remove_peft_adapter(peft_name)
            raise
        grads = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}
        return _Adapter(spec, peft_name, params, grads, _new_optimizer(params))

    def _inject(self, peft_name: str, config: Any) -> None:
        from peft import get_peft_model

        # PEFT warns about tied embeddings (we never merge) and builds nn.Linear layers with
        # the global RNG: keep both out of the caller's way.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            if self._peft is None:
                self._peft = get_peft_model(self._base, config, adapter_name=peft_name)
            else:
                self._peft.add_adapter(peft_name, config)
        self._peft.eval()
        self._active_peft, self._lora_cache = None, None

    def _peft_params(self, peft_name: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's parameters keyed as PEFT saves them: without the adapter name."""
        marker = f".{peft_name}."
        params = {}
        for name, param in self._peft.named_parameters():
            if marker in name:
                if param.dtype != torch.float32:  # adapters train in fp32 even on a bf16 base
                    param.data = param.data.float()
                params[name.replace(marker, ".")] = param
        return dict(sorted(params.items()))

    def _remove_peft_adapter(self, peft_name: str) -> None:
        if self._peft is None or peft_name not in self._peft.peft_config:
            return
        self._active_peft, self._lora_cache = None, None
        if len(self._peft.peft_config) == 1:
            # PeftModel cannot run with zero adapters; unwrap back to the plain base model.
            self._base = self._peft.unload()
            self._base.eval().requires_grad_(False)
            self._peft = None
        else:
            with warnings.catch_warnings():  # "active adapter was deleted": we always re-set it
                warnings.simplefilter("ignore")
                self._peft.delete_adapter(peft_name)

    @contextlib.contextmanager
    def _activate(self, adapter_id: str | None) -> Iterator[Any]:
        """Yield the model computing with exactly this adapter (None: the bare base).

        Called for every forward pass, decoding steps included, so it must cost nothing
        that grows with the adapters loaded: PEFT's `set_adapter` and `disable_adapter`
        walk every module and parameter of the model (with 8 adapters loaded they took
        three times as long as the decoding step itself). The active adapter is set only
        when it changes, and the bare base is computed by switching off the LoRA layers'
        own `_disable_adapters` flag, kept in a list built when adapters come and go."""
        if self._peft is None:
            yield self._base
            return
        if adapter_id is None:
            layers = self._lora_layers()
            for layer in layers:
                layer._disable_adapters = True
            try:
                yield self._peft
            finally:
                for layer in layers:
                    layer._disable_adapters = False
            return
        name = self._get(adapter_id).peft_name
        if self._active_peft != name:
            self._peft.set_adapter(name)
            self._active_peft = name
        yield self._peft

    def _lora_layers(self) -> list[Any]:
        """The PEFT model's LoRA layers (cached until an adapter is added or removed)."""
        if self._lora_cache is None:
            self._lora_cache = [] if self._peft is None else [
                m for m in self._peft.modules() if _is_lora_layer(m)]
        return self._lora_cache

    # -- forward / backward ------------------------------------------------------------------

    def forward_backward(
        self,
        adapter_id: str | None,
        data: list[TrainingDatum],
        loss_fn: str,
        loss_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        with self._lock:
            job = self._ready(TrainingPass(adapter_id, data, loss_fn, loss_config, forward_only))
            outputs: list[dict[str, np.ndarray]] = []
            request_grads: dict[str, torch.Tensor] | None = None
            total = 0.0
            with self._activate(adapter_id) as model:
                for chunk in self._chunks(job.batch):
                    chunk_loss, chunk_out, grads = self._run_chunk(
                        model, chunk, loss_fn, job.config, job.trains
                    )
                    total += chunk_loss
                    outputs.extend(chunk_out)
                    request_grads = _add_grads(request_grads, grads)
            if not math.isfinite(total):
                raise NonFiniteError(f"the {loss_fn} loss summed to {total}")
            if job.trains is not None and request_grads is not None:
                _commit_grads(job.trains, request_grads)
            return ForwardBackwardResult(outputs=outputs, metrics={"loss:sum": total})

    def _ready(self, job: TrainingPass) -> _Job:
        """A job's datums through the guard, its loss config resolved, its adapter found."""
        if job.adapter_id is None and not job.forward_only:
            raise UserInputError("the base model has no adapter to train: use forward")
        adapter = None if job.adapter_id is None else self._get(job.adapter_id)
        return _Job(job, {**LOSS_CONFIG_DEFAULTS[job.loss_fn], **job.loss_config}, adapter,
                    [self._prepare(i, datum) for i, datum in enumerate(job.data)])

    def forward_backward_many(
        self, jobs: Sequence[TrainingPass]
    ) -> list[ForwardBackwardResult | UserInputError]:
        """Jobs of different runs in one forward and one backward pass when their datums
        fit one chunk: each job's rows compute with its own run's adapter (`_segmented`)
        and each run's loss differentiates only its own adapter, so every result and
        gradient is the job's alone. Otherwise (or with two jobs of one run) one after
        the other. A job that fails — bad ids, a loss or gradient that is not finite —
        fails alone and changes nothing."""
        with self._lock:
            trained = [j.adapter_id for j in jobs if j.adapter_id is not None]
            if (not self.batch_across_runs or len(jobs) < 2
                    or len(set(trained)) < len(trained) or not self._segmentable()):
                return super().forward_backward_many(jobs)
            results: list[ForwardBackwardResult | UserInputError | None] = [None] * len(jobs)
            ready: list[tuple[int, _Job]] = []
            for i, job in enumerate(jobs):
                try:
                    ready.append((i, self._ready(job)))
                except UserInputError as exc:
                    results[i] = exc
            rows = [d for _, job in ready for d in job.batch]
            if len(ready) > 1 and max(len(d.tokens) for d in rows) * len(rows) \
                    <= self.max_batch_tokens:
                together = self._run_together([job for _, job in ready])
                self.batched_passes += 1
            else:
                together = super().forward_backward_many([job.job for _, job in ready])
            for (i, _), result in zip(ready, together, strict=True):
                results[i] = result
            return [r for r in results if r is not None]

    def _segmentable(self) -> bool:
        """Every LoRA layer is a linear one (the segment hook's formula)."""
        from peft.tuners.lora import Linear

        return all(isinstance(m, Linear) for m in self._lora_layers())

    def _run_together(self, jobs: list[_Job]) -> list[ForwardBackwardResult | UserInputError]:
        rows = [d for job in jobs for d in job.batch]
        trains = [job.trains for job in jobs if job.trains is not None]
        adapters = [job.job.adapter_id for job in jobs for _ in job.batch]
        with torch.enable_grad() if trains else torch.no_grad(), \
                self._segmented(adapters) as model, _trainable(trains):
            logps = self._target_logprobs(model, rows)
            parts, start = [], 0
            for job in jobs:
                parts.append(_Losses.of(job.job.loss_fn, job.config, job.batch,
                                        logps[start:start + len(job.batch)], job.trains))
                start += len(job.batch)
            to_train = [p for p in parts if p.error is None and p.trains is not None]
            if to_train:
                _split_gradients(to_train)
        return [part.result() for part in parts]

    @contextlib.contextmanager
    def _segmented(self, adapters: Sequence[str | None]) -> Iterator[Any]:
        """The model computing row i of a batch with adapters[i] (None: the bare base).
        One adapter for every row: PEFT as usual. Several: PEFT computes the base alone,
        and a forward hook on each LoRA layer adds each run of rows' LoRA term on those
        rows (segmented LoRA, as in Punica/S-LoRA, on contiguous rows)."""
        runs = _runs(adapters)
        if len(runs) == 1:
            with self._activate(runs[0][2]) as model:
                yield model
            return
        if not self._segmentable():
            raise UserInputError("this server's adapters cannot be mixed in one batch")
        segments = [(start, end, None if a is None else self._get(a).peft_name)
                    for start, end, a in runs]
        with self._activate(None) as model:
            handles = [module.register_forward_hook(_segment_hook(segments))
                       for module in self._lora_layers()]
            try:
                yield model
            finally:
                for handle in handles:
                    handle.remove()

    def _run_chunk(
        self,
        model: Any,
        chunk: list[_Datum],
        loss_fn: str,
        config: dict[str, float],
        adapter: _Adapter | None,
    ) -> tuple[float, list[dict[str, np.ndarray]], dict[str, torch.Tensor] | None]:
        """Loss, per-datum outputs and (with an adapter to train) this chunk's gradients."""
        grad_context = torch.enable_grad() if adapter is not None else torch.no_grad()
        with grad_context:
            part = _Losses.of(loss_fn, config, chunk, self._target_logprobs(model, chunk),
                              adapter)
            if part.error is not None:
                raise part.error
            grads = None
            if adapter is not None:
                grads = _adapter_gradients(part.total, [adapter])[0]
                if not _tensors_finite(list(grads.values())):
                    raise NonFiniteError("the gradient is not finite; nothing was accumulated")
        return float(part.total.detach().double()), part.outputs(), grads

    def _target_logprobs(self, model: Any, chunk: list[_Datum]) -> list[torch.Tensor]:
        """log p(target_i | tokens_0..i) per datum, fp32; no shift (the client did it).
        (N,) for 1-D targets; (N, K) for 2-D targets, one logprob per candidate."""
        lengths = [len(d.tokens) for d in chunk]
        width = max(lengths)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
        columns = [1 if d.targets.dim() == 1 else int(d.targets.shape[1]) for d in chunk]
        targets = torch.zeros((len(chunk), width, max(columns)), dtype=torch.long,
                              device=self.device)
        for row, datum in enumerate(chunk):
            n, k = lengths[row], columns[row]
            ids[row, :n] = datum.tokens
            targets[row, :n, :k] = datum.targets.reshape(n, k)
        # Padding is on the right and attention is causal, so no real position ever attends
        # to a pad: no mask is needed, which keeps attention on the fast causal kernel.
        logits = model(input_ids=ids, use_cache=False).logits.float()
        # log_softmax + gather: measurably cheaper forward+backward here than
        # gather - logsumexp on a (batch, length, vocab) tensor. One gather for the whole
        # chunk (padded candidate columns gather id 0 and are dropped below).
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets)
        return [logp[row, :n, 0] if chunk[row].targets.dim() == 1 else logp[row, :n, :k]
                for row, (n, k) in enumerate(zip(lengths, columns, strict=True))]

    def _chunks(self, batch: list[_Datum]) -> Iterator[list[_Datum]]:
        """Consecutive datums whose padded size stays within max_batch_tokens (bounds the
        activation memory of a large request; one long datum still forms its own chunk)."""
        chunk: list[_Datum] = []
        width = 0
        for datum in batch:
            new_width = max(width, len(datum.tokens))
            if chunk and new_width * (len(chunk) + 1) > self.max_batch_tokens:
                yield chunk
                chunk, new_width = [], len(datum.tokens)
            chunk.append(datum)
            width = new_width
        if chunk:
            yield chunk

    def _prepare(self, index: int, datum: TrainingDatum) -> _Datum:
        """A validated datum (engine.values) on the device, once the guard passes it."""
        targets = datum.loss_inputs["target_tokens"]
        self.guard(datum.tokens, f"data[{index}].model_input")
        self.guard(targets, f"data[{index}].target_tokens")
        inputs = {key: self._to_device(value) for key, value in datum.loss_inputs.items()
                  if key != "target_tokens"}
        return _Datum(tokens=self._to_device(datum.tokens), targets=self._to_device(targets),
                      inputs=inputs)

    def guard(self, ids: Sequence[int] | np.ndarray, what: str, generated: int = 0) -> None:
        """The engine's one input check, its isolation invariant: every id inside this
        model's embedding table and every sequence (with the `generated` tokens to come)
        inside its context. Everything else about a request was checked when its value
        objects were built (engine.values)."""
        check_ids_fit(ids, self._held, what)
        check_length_fits(len(ids) + generated, self._held, what)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, device=self.device)

    # -- optimizer ---------------------------------------------------------------------------

    def optim_step(self, adapter_id: str, step: AdamStep) -> dict[str, float]:
        with self._lock:
            adapter = self._get(adapter_id)
            params = list(adapter.params.values())
            grad_norm = float(_global_norm(list(adapter.grads.values())))
            saved = _snapshot(adapter)
            try:
                # Clipping scales .grad in place: give it copies so a failed step leaves the
                # accumulator untouched; without clipping the optimizer only reads them.
                clip = step.grad_clip_norm > 0
                for key, param in adapter.params.items():
                    param.grad = adapter.grads[key].clone() if clip else adapter.grads[key]
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, step.grad_clip_norm)
                _set_hyperparameters(adapter.optimizer, step)
                adapter.optimizer.step()
                if not _all_finite(adapter):
                    raise NonFiniteError(
                        "the AdamW update produced non-finite weights; nothing was applied"
                    )
            except BaseException:
                _restore(adapter, saved)
                raise
            finally:
                for param in params:
                    param.grad = None
            for grad in adapter.grads.values():
                grad.zero_()
            return {"grad_norm:mean": grad_norm, "learning_rate:mean": step.learning_rate}

    # -- checkpoints -------------------------------------------------------------------------

    def save_adapter(self, adapter_id: str, directory: Path, with_optimizer: bool) -> int:
        with self._lock:
            adapter = self._get(adapter_id)
            optimizer = None
            if with_optimizer:
                optimizer = {}
                for key, param in adapter.params.items():
                    state = adapter.optimizer.state.get(param)
                    if state:
                        optimizer[key] = {
                            "exp_avg": state["exp_avg"].detach().cpu(),
                            "exp_avg_sq": state["exp_avg_sq"].detach().cpu(),
                            "step": torch.as_tensor(state["step"], dtype=torch.float32).cpu(),
                        }
            checkpoint = AdapterFiles(
                spec=adapter.spec,
                base_model=self.info.name,
                lora_alpha=LORA_ALPHA,
                adapter={k: p.detach().cpu() for k, p in adapter.params.items()},
                optimizer=optimizer,
            )
            return write_checkpoint(Path(directory), checkpoint)

    def load_adapter(self, adapter_id: str, directory: Path, with_optimizer: bool) -> LoraSpec:
        with self._lock:
            _check_adapter_id(adapter_id)
            checkpoint = read_checkpoint(Path(directory), with_optimizer)
            if checkpoint.base_model != self.info.name:
                raise UserInputError(
                    f"checkpoint was trained on {checkpoint.base_model!r}, "
                    f"not on this base model {self.info.name!r}"
                )
            if checkpoint.lora_alpha != LORA_ALPHA:
                raise UserInputError(f"checkpoint uses lora_alpha {checkpoint.lora_alpha}")
            self._check_spec(checkpoint.spec)
            # Build the replacement beside the old adapter; swap only once it loaded fully.
            fresh = self._new_adapter(checkpoint.spec)
            try:
                _load_into(fresh, checkpoint)
            except BaseException:
                self._remove_peft_adapter(fresh.peft_name)
                raise
            old = self._adapters.get(adapter_id)
            self._adapters[adapter_id] = fresh
            if old is not None:
                self._remove_peft_adapter(old.peft_name)
            return checkpoint.spec

    # -- sampling ----------------------------------------------------------------------------

    def sample(self, adapter_id: str | None, spec: SampleSpec) -> SampleResult:
        with self._lock:
            decoder = self.batch_decoder()
            decoder.add(0, adapter_id, spec)
            return decoder.run()[0]

    def batch_decoder(self) -> BatchDecoder:
        """Sampling requests decoded together (engine.decoding); each of its calls holds
        this backend's lock."""
        return BatchDecoder(self)

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def forward_rows(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        """One inference forward pass in which row i computes with adapters[i] (None: the
        bare base; `_segmented`)."""
        with self._segmented(adapters) as model:
            return model(**inputs)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated tokens, special tokens kept (stop strings match against it)."""
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=False))

    def score_prompt(self, logits: torch.Tensor, spec: SampleSpec, result: SampleResult) -> None:
        """Fill the result's prompt logprobs (and their top-k) from the prefill's logits."""
        logp = torch.log_softmax(logits, dim=-1)  # row i predicts prompt[i + 1]
        if spec.prompt_logprobs:
            following = torch.tensor(spec.prompt[1:], dtype=torch.long, device=self.device)
            picked = logp.gather(-1, following.unsqueeze(-1)).squeeze(-1).tolist()
            result.prompt_logprobs = [None, *picked]
        if spec.topk_prompt_logprobs > 0:
            rows = topk_rows(logp, spec.topk_prompt_logprobs)
            result.topk_prompt_logprobs = [None, *rows]

    # -- evaluation helpers ------------------------------------------------------------------

    def score_continuations(self, adapter_id: str | None, prompt: Sequence[int],
                            continuations: Sequence[Sequence[int]]) -> list[float]:
        return self.score_continuation_sets(adapter_id, [(prompt, continuations)])[0]

    def score_continuation_sets(
        self, adapter_id: str | None,
        sets: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    ) -> list[list[float]]:
        """Prompts run together (left-padded) after the prefix they all share, which runs
        once per batch; then every continuation of every prompt in the batch runs in one
        pass over its prompt's cache."""
        with self._lock:
            for index, (prompt, continuations) in enumerate(sets):
                self._guard_all([prompt, *continuations], f"scored set {index}")
                if not prompt or not continuations or any(not c for c in continuations):
                    raise UserInputError(f"scored set {index} needs a prompt and non-empty "
                                         "continuations")
            if adapter_id is not None:
                self._get(adapter_id)
            rows = [(list(p), [list(c) for c in cs]) for p, cs in sets]
            shared = _shared_prefix([prompt for prompt, _ in rows]) if rows else 0
            scores: list[list[float]] = []
            with torch.inference_mode(), self._activate(adapter_id) as model:
                for batch in _set_batches(rows, SET_ROWS):
                    scores += self._score_sets(model, shared, batch)
            return scores

    def _score_sets(self, model: Any, shared: int,
                    batch: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        cache = self._prefix_cache(model, batch[0][0][:shared], len(batch))
        suffixes = [prompt[shared:] for prompt, _ in batch]  # each keeps at least one token
        ids, prompt_mask = self.padded(suffixes, left=True)  # every last column is real
        ones = torch.ones((len(batch), shared), dtype=torch.long, device=self.device)
        context_mask = torch.cat([ones, prompt_mask], -1)
        positions = shared + (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=context_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        owner = [row for row, (_, conts) in enumerate(batch) for _ in conts]
        flat = [cont for _, conts in batch for cont in conts]
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor(owner, device=self.device))
        logp = self._continuation_logprobs(model, cache, context_mask[owner],
                                           [shared + len(suffixes[r]) for r in owner], flat)
        totals = iter([float(first[r, cont[0]]) + logp[k] for k, (r, cont) in
                       enumerate(zip(owner, flat, strict=True))])
        return [[next(totals) for _ in conts] for _, conts in batch]

    def _prefix_cache(self, model: Any, prefix: list[int], rows: int) -> Any:
        """The KV cache of `prefix`, repeated for `rows` rows (None without a prefix)."""
        if not prefix:
            return None
        cache = model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                      logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(rows)
        return cache

    def _continuation_logprobs(self, model: Any, cache: Any, context_mask: torch.Tensor,
                               starts: list[int], conts: list[list[int]]) -> list[float]:
        """Sum of log P(cont[1:] | context, cont[0]) per row, each row on its own cache row
        (whose real positions `context_mask` marks); cont[0] is scored by the caller."""
        ids, mask = self.padded(conts, left=False)  # real tokens never see a pad
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            ids.shape[1], device=self.device)
        logits = model(input_ids=ids, attention_mask=torch.cat([context_mask, mask], -1),
                       position_ids=positions, past_key_values=cache, use_cache=False).logits
        return [self._span_logprob(logits[row, :len(cont) - 1], cont[1:])
                for row, cont in enumerate(conts)]

    def padded(self, rows: Sequence[Sequence[int]], left: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) for rows of unequal length, zero-padded on one side."""
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(rows):
            span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
            ids[row, span] = torch.tensor(list(tokens), device=self.device)
            mask[row, span] = 1
        return ids, mask

    def _span_logprob(self, logits: torch.Tensor, targets: Sequence[int]) -> float:
        """Sum of log P(targets[i]) under logits[i] (0.0 for no targets)."""
        if not targets:
            return 0.0
        logp = torch.log_softmax(logits.float(), dim=-1)
        return float(logp.gather(-1, torch.tensor(list(targets), device=self.device)
                                 .unsqueeze(-1)).sum())

    def score_answers(self, adapter_id: str | None,
                      pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """As the default, with the prefix every prompt shares (a chat template's system
        turn) run once per batch into a KV cache instead of once per pair, and logits
        computed only where an answer token is predicted."""
        with self._lock:
            for index, (prompt, answer) in enumerate(pairs):
                if not prompt or not answer:
                    raise UserInputError(f"scored pair {index} needs a prompt and an answer")
                self.guard([*prompt, *answer], f"scored pair {index}")
            if adapter_id is not None:
                self._get(adapter_id)
            shared = _shared_prefix([list(prompt) for prompt, _ in pairs])
            order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
            scores = [0.0] * len(pairs)
            with torch.inference_mode(), self._activate(adapter_id) as model:
                for start in range(0, len(order), ANSWER_BATCH):
                    batch = order[start:start + ANSWER_BATCH]
                    rows = [(list(pairs[i][0]), list(pairs[i][1])) for i in batch]
                    for i, score in zip(batch, self._score_pairs(model, shared, rows),
                                        strict=True):
                        scores[i] = score
            return scores

    def _score_pairs(self, model: Any, shared: int,
                     rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log P(answer | prompt) per row; every prompt starts with the same
        `shared` tokens, which run once and are attended to through the cache."""
        cache = self._prefix_cache(model, rows[0][0][:shared], len(rows))
        # Row r feeds (prompt + answer)[shared:-1]; its answer's first token is predicted
        # at index len(prompt) - 1 - shared. Right padding: real tokens never see a pad.
        feeds = [(prompt + answer)[shared:-1] for prompt, answer in rows]
        firsts = [len(prompt) - 1 - shared for prompt, _ in rows]
        ids, mask = self.padded(feeds, left=False)
        ones = torch.ones((len(rows), shared), dtype=torch.long, device=self.device)
        low = min(firsts)
        keep = torch.arange(low, ids.shape[1], device=self.device)
        logits = model(input_ids=ids, attention_mask=torch.cat([ones, mask], -1),
                       past_key_values=cache, use_cache=False, logits_to_keep=keep).logits
        return [self._span_logprob(logits[row, first - low:first - low + len(answer)], answer)
                for row, (first, (_, answer)) in enumerate(zip(firsts, rows, strict=True))]

    def _guard_all(self, sequences: Sequence[Sequence[int]], what: str) -> None:
        for tokens in sequences:
            self.guard(tokens, what)


# ---------------------------------------------------------------------------------------------
# Helpers (module level so they stay small and testable)


def _set_batches(sets: list[tuple[list[int], list[list[int]]]], rows: int
                 ) -> Iterator[list[tuple[list[int], list[list[int]]]]]:
    """Consecutive prompts whose continuations number at most `rows` (a prompt with more
    forms a batch of its own)."""
    batch: list[tuple[list[int], list[list[int]]]] = []
    for item in sets:
        if batch and sum(len(c) for _, c in batch) + len(item[1]) > rows:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own
    (the answer's first token is predicted from the prompt's last position)."""
    shared = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for prompt in prompts[1:]:
        shared = next((i for i in range(shared) if prompt[i] != first[i]), shared)
    return max(shared, 0)


def _check_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not adapter_id:
        raise UserInputError(f"adapter id must be a non-empty string, got {adapter_id!r}")


def _init_lora(params: dict[str, torch.nn.Parameter], seed: int) -> None:
    """Kaiming-uniform A (as nn.Linear/PEFT) and zero B, from a private generator on the CPU
    so the same seed gives the same adapter whatever the device or global RNG state."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for key, param in params.items():  # sorted keys: a stable draw order
            if ".lora_A." in key:
                init = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
                param.copy_(init)
            else:
                param.zero_()


def _new_optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
    # Hyper-parameters are overwritten from each AdamStep before every step.
    return torch.optim.AdamW(list(params.values()), lr=0.0, weight_decay=0.0)


def _adapter_gradients(loss: torch.Tensor, adapters: list[_Adapter]
                       ) -> list[dict[str, torch.Tensor]]:
    """d loss / d each adapter's parameters (zeros where the loss does not reach one)."""
    params = [p for adapter in adapters for p in adapter.params.values()]
    grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
    return [{key: torch.zeros_like(param) if (grad := next(grads)) is None else grad.float()
             for key, param in adapter.params.items()} for adapter in adapters]


def _is_lora_layer(module: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _runs(adapters: Sequence[str | None]) -> list[tuple[int, int, str | None]]:
    """Maximal runs of rows with the same adapter: (start, end, adapter id)."""
    runs: list[tuple[int, int, str | None]] = []
    for row, adapter in enumerate(adapters):
        if runs and runs[-1][2] == adapter:
            runs[-1] = (runs[-1][0], row + 1, adapter)
        else:
            runs.append((row, row + 1, adapter))
    return runs


def _segment_hook(segments: list[tuple[int, int, str | None]]) -> Any:
    """A LoRA layer's forward hook: its base output plus, on each segment's rows, that
    segment's adapter's term (alpha/r) · B A x, as PEFT computes it for one adapter."""

    def hook(module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        parts = []
        for start, end, name in segments:
            part = output[start:end]
            if name is not None and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                lora = (x[start:end].to(a.dtype) @ a.T) @ b.T * module.scaling[name]
                part = part + lora.to(output.dtype)
            parts.append(part)
        return torch.cat(parts)

    return hook


@contextlib.contextmanager
def _trainable(adapters: list[_Adapter]) -> Iterator[None]:
    """Let gradients reach every one of these adapters at once (PEFT marks only its active
    adapter trainable); the flags are restored afterwards."""
    params = [p for adapter in adapters for p in adapter.params.values()]
    before = [p.requires_grad for p in params]
    try:
        for param in params:
            param.requires_grad_(True)
        yield
    finally:
        for param, flag in zip(params, before, strict=True):
            param.requires_grad_(flag)


def _split_gradients(parts: list[_Losses]) -> None:
    """One backward pass for the summed losses of several jobs, each training its own
    adapter: rows never mix, so each adapter's gradient is its own job's."""
    adapters = [part.trains for part in parts if part.trains is not None]
    total = torch.stack([part.total for part in parts]).sum()
    for part, grads in zip(parts, _adapter_gradients(total, adapters), strict=True):
        part.grads = grads
        if not _tensors_finite(list(grads.values())):
            part.error = NonFiniteError("the gradient is not finite; nothing was accumulated")


def _tensors_finite(tensors: list[torch.Tensor]) -> bool:
    """One check (and one device sync) over many tensors instead of one per tensor.

    A sum is finite exactly when no entry is NaN or ±Inf, unless finite entries add up
    past the float range (~3e38) — weights that large are broken anyway. One reduction
    per tensor is several times cheaper than an elementwise isfinite mask."""
    if not tensors:
        return True
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    return bool(torch.isfinite(sums).all())


def _add_grads(
    total: dict[str, torch.Tensor] | None, grads: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    if grads is None:
        return total
    if total is None:
        return grads
    return {key: total[key] + grads[key] for key in total}


def _commit_grads(adapter: _Adapter, request: dict[str, torch.Tensor]) -> None:
    """Add a request's gradients to the accumulator only if every sum stays finite."""
    summed = {key: adapter.grads[key] + grad for key, grad in request.items()}
    if not _tensors_finite(list(summed.values())):
        raise NonFiniteError("the accumulated gradient would overflow; nothing was accumulated")
    adapter.grads = summed


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _set_hyperparameters(optimizer: torch.optim.AdamW, step: AdamStep) -> None:
    for group in optimizer.param_groups:
        group["lr"] = float(step.learning_rate)
        group["betas"] = (float(step.beta1), float(step.beta2))
        group["eps"] = float(step.eps)
        group["weight_decay"] = float(step.weight_decay)


def _snapshot(adapter: _Adapter) -> dict[str, Any]:
    params = {key: p.detach().clone() for key, p in adapter.params.items()}
    state = {
        key: {name: _clone(value) for name, value in adapter.optimizer.state[p].items()}
        for key, p in adapter.params.items()
        if p in adapter.optimizer.state
    }
    return {"params": params, "state": state}


def _restore(adapter: _Adapter, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for key, param in adapter.params.items():
            param.copy_(saved["params"][key])
            if key in saved["state"]:
                adapter.optimizer.state[param] = saved["state"][key]
            else:
                adapter.optimizer.state.pop(param, None)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _all_finite(adapter: _Adapter) -> bool:
    """Weights and Adam moments of the adapter, all finite."""
    tensors: list[torch.Tensor] = list(adapter.params.values())
    for param in adapter.params.values():
        state = adapter.optimizer.state.get(param, {})
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1)
    return _tensors_finite([t.detach() for t in tensors])


def _load_into(adapter: _Adapter, checkpoint: AdapterFiles) -> None:
    """Copy checkpoint tensors (and optimizer state) into a freshly created adapter."""
    expected = {key: tuple(p.shape) for key, p in adapter.params.items()}
    found = {key: tuple(t.shape) for key, t in checkpoint.adapter.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise UserInputError(
            "checkpoint tensors do not fit this base model and LoRA spec "
            f"(missing {missing}, unexpected {extra}, or shapes differ)"
        )
    with torch.no_grad():
        for key, param in adapter.params.items():
            param.copy_(checkpoint.adapter[key])
    for key, state in (checkpoint.optimizer or {}).items():
        param = adapter.params[key]
        adapter.optimizer.state[param] = {
            # torch keeps AdamW's step count as a CPU float32 scalar (non-capturable mode).
            "step": state["step"].reshape(()).to(torch.float32).clone(),
            "exp_avg": state["exp_avg"].to(param.device, torch.float32).clone(),
            "exp_avg_sq": state["exp_avg_sq"].to(param.device, torch.float32).clone(),
        }
