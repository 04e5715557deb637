"""Decoding sampling requests together: continuous batching at token granularity.

Owns `BatchDecoder`, which `TorchBackend.batch_decoder()` hands out, and the token-choice
rules (`choose_tokens`: temperature, top-k, top-p; `topk_rows`). Requests — each with its
own adapter or the bare base, settings, seed and stop rules — may be added before any step.
A step first prefills what was added since the last one in one forward pass (one row per
distinct (adapter, prompt) pair, left-padded; a request's samples then share its prompt's
KV-cache row), joins those rows to the running batch, draws one token for every live row —
each request from its own generator over its own rows, in the order it would alone, so a
seeded request draws the same tokens batched or not — and runs one forward pass over every
live row of every request, each row with its own LoRA adapter (the backend's
`forward_rows`). Finished rows leave the cache; a request whose samples have all finished is
returned by that step.

Must not know about the database, HTTP, policy or screening. Runs under its backend's lock
and in inference mode; the backend checks every request (`guard`) when it is added.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine.backend import SampledSequence, SampleResult, SamplingBatch
from engine.values import SampleSpec

if TYPE_CHECKING:
    from engine.torch_backend import TorchBackend


@dataclass(eq=False)  # hashed by identity: a request groups its rows
class _Request:
    """One sampling request in the batch: its settings, generator and what it drew."""

    key: Hashable
    adapter: str | None
    spec: SampleSpec
    generator: torch.Generator
    stop_ids: frozenset[int]
    result: SampleResult = field(default_factory=lambda: SampleResult(sequences=[]))
    steps: int = 0  # tokens drawn per sample so far
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    topk: list[list[list[tuple[int, float]]]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.spec.num_samples
        self.tokens, self.logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
        self.topk, self.stopped = [[] for _ in range(n)], [False] * n

    @property
    def scores_prompt(self) -> bool:
        return self.spec.prompt_logprobs or self.spec.topk_prompt_logprobs > 0

    def finish(self) -> SampleResult:
        want_topk = self.spec.topk_sample_logprobs > 0
        self.result.sequences = [
            SampledSequence(tokens=self.tokens[i], logprobs=self.logprobs[i],
                            stopped=self.stopped[i], topk=self.topk[i] if want_topk else None)
            for i in range(self.spec.num_samples)]
        return self.result


@dataclass
class _Rows:
    """Live rows of a KV cache: which (request, sample) each row is, the cache, its
    attention mask (left padding is 0), the next position id of each row and the logits
    each row draws its next token from."""

    rows: list[tuple[_Request, int]]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    padded: bool

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.logits = self.logits[index]


class BatchDecoder(SamplingBatch):
    """Many sampling requests decoded together; see the module docstring."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self._waiting: list[_Request] = []
        self._live: _Rows | None = None

    @property
    def rows(self) -> int:
        """Cache rows in use or about to be (samples of live and waiting requests)."""
        live = len(self._live.rows) if self._live is not None else 0
        return live + sum(r.spec.num_samples for r in self._waiting)

    @property
    def empty(self) -> bool:
        return self._live is None and not self._waiting

    @property
    def can_join(self) -> bool:
        """Whether requests added now join the running rows at the next step (otherwise
        they start once those have finished: a cache this decoder cannot pad)."""
        return self._live is None or _paddable(self._live.cache)

    def add(self, key: Hashable, adapter_id: str | None, spec: SampleSpec) -> None:
        """Queue a request for the next step; a UserInputError (ids that do not fit, an
        unknown adapter) leaves the batch as it was."""
        with self.backend.lock:
            self._add(key, adapter_id, spec)

    def _add(self, key: Hashable, adapter_id: str | None, spec: SampleSpec) -> None:
        backend = self.backend
        backend.guard(spec.prompt, "the prompt", generated=spec.max_tokens)
        backend.guard(spec.stop_token_ids or (), "the stop token ids")
        if adapter_id is not None:
            backend.adapter_spec(adapter_id)
        default = spec.stop_token_ids is None and spec.stop_strings is None
        stop_ids = backend.info.eos_token_ids if default else spec.stop_token_ids or ()
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=backend.device).manual_seed(seed)
        self._waiting.append(_Request(key, adapter_id, spec, generator, frozenset(stop_ids)))

    def step(self) -> list[tuple[Hashable, SampleResult]]:
        """Prefill what was added (when it can join), draw one token per live row and
        advance; returns the requests that finished, with their results."""
        with self.backend.lock, torch.inference_mode():
            if self._waiting and self.can_join:
                self._prefill()
            live = self._live
            if live is None:
                return []
            chosen = self._choose(live)
            finished, keep = self._record(live, chosen)
            if not keep:
                self._live = None
            else:
                if len(keep) < len(live.rows):
                    live.select(keep)
                    chosen = chosen[torch.tensor(keep, device=chosen.device)]
                self._advance(live, chosen)
        return [(request.key, request.finish()) for request in finished]

    # -- internals -----------------------------------------------------------------------

    def _prefill(self) -> None:
        waiting, self._waiting = self._waiting, []
        # Prompt scoring needs logits at every prompt position: those requests prefill
        # alone; the rest together, keeping only each prompt's last logits.
        groups = [[r] for r in waiting if r.scores_prompt]
        plain = [r for r in waiting if not r.scores_prompt]
        if plain:
            groups.append(plain)
        for group in groups:
            rows = self._prefill_group(group)
            self._live = rows if self._live is None else _join(self._live, rows)

    def _prefill_group(self, group: list[_Request]) -> _Rows:
        backend = self.backend
        distinct: dict[tuple[str | None, tuple[int, ...]], int] = {}
        for request in group:
            distinct.setdefault((request.adapter, request.spec.prompt), len(distinct))
        ids, mask = backend.padded([prompt for _, prompt in distinct], left=True)
        padded = not bool(mask.all())
        scores = group[0].scores_prompt
        out = backend.forward_rows(
            [adapter for adapter, _ in distinct], input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=_positions(mask) if padded else None,
            use_cache=True, logits_to_keep=0 if scores else 1)
        if scores:  # a group of its own, never padded
            backend.score_prompt(out.logits[0, :-1].float(), group[0].spec, group[0].result)
        index = [distinct[(r.adapter, r.spec.prompt)]
                 for r in group for _ in range(r.spec.num_samples)]
        rows = [(r, s) for r in group for s in range(r.spec.num_samples)]
        select = torch.tensor(index, device=backend.device)
        cache = out.past_key_values
        cache.batch_select_indices(select)
        return _Rows(rows, cache, mask[select], mask.sum(-1)[select],
                     out.logits[:, -1].float()[select], padded)

    def _choose(self, live: _Rows) -> torch.Tensor:
        """One token per row, each request drawing from its own generator over its rows."""
        chosen = torch.empty(len(live.rows), dtype=torch.long, device=live.logits.device)
        for request, rows in _by_request(live.rows).items():
            index = torch.tensor(rows, device=live.logits.device)
            chosen[index] = choose_tokens(live.logits[index], request.spec, request.generator)
        return chosen

    def _record(self, live: _Rows, chosen: torch.Tensor
                ) -> tuple[list[_Request], list[int]]:
        """Record each row's token; returns the requests that finished and the rows that go
        on."""
        # Reported logprobs come from the raw distribution (temperature 1, no top-k/top-p).
        logp = torch.log_softmax(live.logits, dim=-1)
        picked = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        tokens = chosen.tolist()
        k = max(request.spec.topk_sample_logprobs for request, _ in live.rows)
        top = topk_rows(logp, k) if k > 0 else None
        for row, (request, sample) in enumerate(live.rows):
            request.tokens[sample].append(tokens[row])
            request.logprobs[sample].append(float(picked[row]))
            if top is not None and request.spec.topk_sample_logprobs > 0:
                request.topk[sample].append(top[row][:request.spec.topk_sample_logprobs])
            request.stopped[sample] = (tokens[row] in request.stop_ids
                                       or self._hit_stop_string(request, sample))
        requests = _by_request(live.rows)
        for request in requests:
            request.steps += 1
        keep = [row for row, (request, sample) in enumerate(live.rows)
                if not request.stopped[sample] and request.steps < request.spec.max_tokens]
        going = {live.rows[row][0] for row in keep}
        return [r for r in requests if r not in going], keep

    def _advance(self, live: _Rows, chosen: torch.Tensor) -> None:
        """One forward pass over every live row with its last token."""
        live.mask = torch.cat([live.mask, live.mask.new_ones((len(live.rows), 1))], dim=-1)
        out = self.backend.forward_rows(
            [request.adapter for request, _ in live.rows], input_ids=chosen.unsqueeze(-1),
            attention_mask=live.mask if live.padded else None,
            position_ids=live.positions.unsqueeze(-1) if live.padded else None,
            past_key_values=live.cache, use_cache=True)
        live.positions = live.positions + 1
        live.logits, live.cache = out.logits[:, -1].float(), out.past_key_values

    def _hit_stop_string(self, request: _Request, sample: int) -> bool:
        stops = request.spec.stop_strings
        if not stops:
            return False
        text = self.backend.decode(request.tokens[sample])
        return any(stop in text for stop in stops)


def _by_request(rows: list[tuple[_Request, int]]) -> dict[_Request, list[int]]:
    """Each request's rows, in row order (requests hash by identity)."""
    grouped: dict[_Request, list[int]] = {}
    for row, (request, _) in enumerate(rows):
        grouped.setdefault(request, []).append(row)
    return grouped


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row's real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _paddable(cache: Any) -> bool:
    """Whether rows of this cache can be left-padded and stacked with others: every layer
    a plain growing key/value layer (not sliding-window or static)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _join(live: _Rows, new: _Rows) -> _Rows:
    """Stack `new` rows under the live ones, left-padding whichever cache is shorter."""
    width = max(live.mask.shape[1], new.mask.shape[1])
    for rows in (live, new):
        extra = width - rows.mask.shape[1]
        if extra:
            for layer in rows.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
                layer.values = F.pad(layer.values, (0, 0, extra, 0))
            rows.mask = F.pad(rows.mask, (extra, 0))
            rows.padded = True
    for old, add in zip(live.cache.layers, new.cache.layers, strict=True):
        old.keys = torch.cat([old.keys, add.keys])
        old.values = torch.cat([old.values, add.values])
    return _Rows(live.rows + new.rows, live.cache, torch.cat([live.mask, new.mask]),
                 torch.cat([live.positions, new.positions]),
                 torch.cat([live.logits, new.logits]), live.padded or new.padded)


def choose_tokens(
    logits: torch.Tensor, spec: SampleSpec, generator: torch.Generator
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else temperature → top-k → top-p → draw."""
    if spec.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / spec.temperature
    if 0 < spec.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, spec.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if spec.top_p < 1.0:
        scaled = _nucleus(scaled, spec.top_p)
    return _draw(torch.softmax(scaled, dim=-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row, with the row's probabilities: inverse-CDF sampling, one uniform
    per row against the row's cumulative sum (in float64, so that rounding over a 50k-token
    vocabulary moves no token's share). On CPU, torch.multinomial over a 49k vocabulary
    took about 9 ms a step for 8 rows, this under 4 ms; a token of probability 0 is never
    drawn (its CDF interval is empty). A uniform that rounds up to the row's total (which
    would point past the end) takes the row's last token of non-zero probability."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(index, last)


def _nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p  # the most likely token always has mass_before 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def topk_rows(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)  # sorted, best first
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]

