"""Tinker wire formats <-> engine dataclasses, with the validation that makes a bad
request a clear user error instead of a crash inside the model.

Owns: decoding the protobuf `ForwardBackwardRequest` (optionally zstd), parsing the JSON
`SampleRequest`, and encoding `ForwardBackwardOutput` / `SampleResponse` results, all with
the SDK's own `tinker.proto` and `tinker.types`. Used by the gateway at submit time (so a
bad request is refused before it is queued) and by the worker when it runs the request.

Must not import torch, fastapi or the database.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as pb

from engine.backend import (
    LOSS_CONFIG_DEFAULTS,
    LOSS_FUNCTIONS,
    LOSS_OPTIONAL_INPUTS,
    LOSS_REQUIRED_INPUTS,
    ForwardBackwardResult,
    ModelInfo,
    SampleResult,
    SampleSpec,
    TrainingDatum,
)
from engine.errors import BodyTooLarge, UserInputError
from engine.sizes import MAX_BODY_BYTES as MAX_BODY_BYTES  # re-exported
from engine.sizes import MAX_DECOMPRESSED_BYTES

_ZSTD_CHUNK = 1024 * 1024
# Stop sequences per sampling request, and the length of each (characters or, for token
# sequences, ids): each is matched against every generated token.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
DEFAULT_MAX_TOKENS = 128
TOPK_SENTINEL = (0, -99999.0)

_NP_DTYPES = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_INT64: "<i8"}
_INT_INPUTS = {"target_tokens"}


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool
    data: list[TrainingDatum]


# ----------------------------------------------------------------- forward_backward in


def decompress_body(body: bytes, content_encoding: str | None,
                    max_bytes: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """Undo `Content-Encoding: zstd` (the only encoding the SDK uses for requests),
    streaming, so that no more than `max_bytes` are ever allocated: a body that declares
    or produces more is refused (BodyTooLarge) as soon as that is known."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise UserInputError(f"unsupported Content-Encoding {content_encoding!r}; use zstd")
    try:
        if zstandard.frame_content_size(body) > max_bytes:
            raise _too_large(max_bytes)
        return _bounded_zstd(body, max_bytes)
    except zstandard.ZstdError as exc:
        raise UserInputError(f"malformed zstd body: {exc}") from exc


def _bounded_zstd(body: bytes, max_bytes: int) -> bytes:
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(body), read_across_frames=True) as reader:
        while chunk := reader.read(min(_ZSTD_CHUNK, max_bytes + 1 - len(out))):
            out += chunk
            if len(out) > max_bytes:
                raise _too_large(max_bytes)
    return bytes(out)


def _too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(f"the zstd request body decompresses to more than the limit of "
                        f"{max_bytes} bytes; split the batch into smaller calls")


def decode_forward_backward(body: bytes, info: ModelInfo | None = None) -> ForwardBackwardCall:
    """Parse and validate a (decompressed) protobuf ForwardBackwardRequest. With `info`,
    token ids and lengths are also checked against the base model."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserInputError(f"malformed protobuf ForwardBackwardRequest: {exc}") from exc
    loss_fn = _check_loss_fn(msg.loss_fn)
    call = ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=loss_fn,
        loss_config=_loss_config(msg, loss_fn),
        forward_only=bool(msg.forward_only),
        data=[_decode_datum(i, d, loss_fn) for i, d in enumerate(msg.data)],
    )
    if not call.model_id:
        raise UserInputError("model_id is required")
    if not call.data:
        raise UserInputError("forward_backward needs at least one datum")
    if info is not None:
        check_tokens_fit(call.data, info)
    return call


def _check_loss_fn(loss_fn: str) -> str:
    if loss_fn == "custom":
        raise UserInputError(
            "loss_fn 'custom' is not accepted: no user code runs on this server; use "
            "forward_backward_custom, which computes the loss in your process"
        )
    if loss_fn not in LOSS_FUNCTIONS:
        raise UserInputError(
            f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSS_FUNCTIONS)}"
        )
    return loss_fn


def _loss_config(msg: pb.ForwardBackwardRequest, loss_fn: str) -> dict[str, float]:
    raw: dict[str, Any] = {}
    for key, value in msg.loss_fn_config_v2.items():
        raw[key] = value.number if value.WhichOneof("value") == "number" else value.text
    if not raw:
        raw = dict(msg.loss_fn_config)
    allowed = LOSS_CONFIG_DEFAULTS[loss_fn]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) or "none"
        raise UserInputError(
            f"loss_fn_config keys {unknown} are not used by {loss_fn} (accepted: {accepted})"
        )
    config = dict(allowed)
    for key, value in raw.items():
        if not isinstance(value, float) or not math.isfinite(value):
            raise UserInputError(f"loss_fn_config[{key!r}] must be a finite number")
        config[key] = value
    return config


def _decode_datum(index: int, datum: pb.Datum, loss_fn: str) -> TrainingDatum:
    tokens: list[int] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserInputError(
                f"datum {index}: {kind} chunks are not supported; this server is text-only"
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise UserInputError(f"datum {index}: token bytes are not packed int32")
        tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
    if not tokens:
        raise UserInputError(f"datum {index}: model_input is empty")
    n = len(tokens)
    inputs = {name: _tensor(index, name, t) for name, t in datum.loss_fn_inputs.items()}
    _check_inputs(index, inputs, loss_fn, n)
    return TrainingDatum(tokens=np.asarray(tokens, dtype=np.int64), loss_inputs=inputs)


def _tensor(index: int, name: str, t: pb.Tensor) -> np.ndarray:
    want = "<i8" if name in _INT_INPUTS else "<f4"
    if _NP_DTYPES.get(t.dtype) != want:
        kind = "int64" if want == "<i8" else "float32"
        raise UserInputError(f"datum {index}: loss_fn_inputs[{name!r}] must be {kind}")
    shape = tuple(int(s) for s in t.shape)
    if len(shape) != 1:
        raise UserInputError(
            f"datum {index}: loss_fn_inputs[{name!r}] must be 1-D (got shape {list(shape)}); "
            "2-D targets are not supported"
        )
    if t.WhichOneof("encoding") == "sparse_csr":
        raise UserInputError(f"datum {index}: loss_fn_inputs[{name!r}] must be dense")
    itemsize = np.dtype(want).itemsize
    if len(t.dense) != shape[0] * itemsize:
        raise UserInputError(
            f"datum {index}: loss_fn_inputs[{name!r}] has {len(t.dense) // itemsize} values "
            f"but shape {list(shape)}"
        )
    array = np.frombuffer(t.dense, dtype=want).copy()
    if want == "<f4" and not np.isfinite(array).all():
        raise UserInputError(f"datum {index}: loss_fn_inputs[{name!r}] has NaN or Inf values")
    return array


def _check_inputs(index: int, inputs: dict[str, np.ndarray], loss_fn: str, n: int) -> None:
    required, optional = LOSS_REQUIRED_INPUTS[loss_fn], LOSS_OPTIONAL_INPUTS[loss_fn]
    missing = [k for k in required if k not in inputs]
    if missing:
        raise UserInputError(f"datum {index}: {loss_fn} needs loss_fn_inputs {missing}")
    unknown = sorted(set(inputs) - set(required) - set(optional))
    if unknown:
        raise UserInputError(f"datum {index}: loss_fn_inputs {unknown} are not used by {loss_fn}")
    for name, array in inputs.items():
        if array.shape[0] != n:
            raise UserInputError(
                f"datum {index}: loss_fn_inputs[{name!r}] has length {array.shape[0]} but "
                f"model_input has {n} tokens (targets are next-token aligned, one per input)"
            )


def check_tokens_fit(data: list[TrainingDatum], info: ModelInfo) -> None:
    """Every token id within the vocabulary, every sequence within the context."""
    for index, datum in enumerate(data):
        if len(datum.tokens) > info.max_context:
            raise UserInputError(
                f"datum {index}: {len(datum.tokens)} tokens exceed the context of "
                f"{info.name} ({info.max_context})"
            )
        for name, ids in (("model_input", datum.tokens),
                          ("target_tokens", datum.loss_inputs.get("target_tokens"))):
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= info.vocab_size):
                bad = int(ids[(ids < 0) | (ids >= info.vocab_size)][0])
                raise UserInputError(
                    f"datum {index}: {name} token id {bad} is outside the vocabulary "
                    f"[0, {info.vocab_size}) of {info.name}"
                )


# ----------------------------------------------------------------- forward_backward out


def encode_forward_backward_result(result: ForwardBackwardResult) -> bytes:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = out.loss_fn_outputs.add()
    record.num_datums = len(result.outputs)
    names = list(result.outputs[0]) if result.outputs else []
    for name in names:
        arrays = [np.ascontiguousarray(d[name], dtype="<f4") for d in result.outputs]
        field = record.fields[name]
        field.dtype = pb.DTYPE_FLOAT32
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype="<i8").tobytes()
        field.trailing_shape.extend(arrays[0].shape[1:])
    for key, value in result.metrics.items():
        if key.count(":") != 1:
            raise ValueError(f"metric key {key!r} must be name:reduction")
        out.metrics[key] = float(value)
    return out.SerializeToString()


# ----------------------------------------------------------------- sampling


@dataclass
class SampleCall:
    sampler_id: str
    seq_id: int
    spec: SampleSpec


def parse_sample_request(body: dict[str, Any], info: ModelInfo | None = None) -> SampleCall:
    """Validate an /asample JSON body with the SDK's own model and map it to a spec."""
    try:
        req = tt.SampleRequest.model_validate(body)
    except ValidationError as exc:
        raise UserInputError(f"invalid sample request: {_first_error(exc)}") from exc
    if not req.sampling_session_id:
        raise UserInputError("sampling_session_id is required")
    for field_name, unsupported in (
        ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
        ("prompt_alt_tokens_k", bool(req.prompt_alt_tokens_k)),
        ("prompt_logprobs_last_n", req.prompt_logprobs_last_n is not None),
    ):
        if unsupported:
            raise UserInputError(f"{field_name} is not supported by this server")
    prompt = _prompt_tokens(req.prompt)
    spec = _sample_spec(req, prompt)
    if info is not None:
        _check_sample_fits(spec, info)
    return SampleCall(sampler_id=req.sampling_session_id, seq_id=req.seq_id or 0, spec=spec)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def _prompt_tokens(prompt: tt.ModelInput) -> tuple[int, ...]:
    tokens: list[int] = []
    for chunk in prompt.chunks:
        if chunk.type != "encoded_text":
            raise UserInputError(f"{chunk.type} chunks are not supported; this server is text-only")
        tokens.extend(chunk.tokens)
    if not tokens:
        raise UserInputError("prompt is empty")
    return tuple(tokens)


def _sample_spec(req: tt.SampleRequest, prompt: tuple[int, ...]) -> SampleSpec:
    params = req.sampling_params
    stop_strings, stop_ids = _stop_sequences(params.stop)
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    _require(req.num_samples >= 1, "num_samples must be at least 1")
    _require(max_tokens >= 1, "sampling_params.max_tokens must be at least 1")
    _require(params.temperature >= 0 and math.isfinite(params.temperature),
             "sampling_params.temperature must be a finite number >= 0")
    _require(0 < params.top_p <= 1, "sampling_params.top_p must be in (0, 1]")
    _require(params.top_k == -1 or params.top_k >= 1, "sampling_params.top_k must be -1 or >= 1")
    _require(req.topk_prompt_logprobs >= 0 and req.topk_sample_logprobs >= 0,
             "top-k logprob counts must be >= 0")
    return SampleSpec(
        prompt=prompt,
        num_samples=req.num_samples,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_strings=stop_strings,
        stop_token_ids=stop_ids,
        prompt_logprobs=bool(req.prompt_logprobs),
        topk_prompt_logprobs=req.topk_prompt_logprobs,
        topk_sample_logprobs=req.topk_sample_logprobs,
    )


def _stop_sequences(stop: Any) -> tuple[tuple[str, ...] | None, tuple[int, ...] | None]:
    """(stop strings, stop token ids), at most MAX_STOP_SEQUENCES of them, each string at
    most MAX_STOP_LENGTH characters; (None, None) for the model's default (EOS)."""
    if stop is None:
        return None, None
    items = [stop] if isinstance(stop, str) else list(stop)
    _require(len(items) <= MAX_STOP_SEQUENCES,
             f"sampling_params.stop has {len(items)} entries; at most {MAX_STOP_SEQUENCES} "
             "stop sequences are accepted")
    strings = [s for s in items if isinstance(s, str)]
    ids = [s for s in items if isinstance(s, int) and not isinstance(s, bool)]
    if len(strings) == len(items):
        longest = max((len(s) for s in strings), default=0)
        _require(longest <= MAX_STOP_LENGTH,
                 f"a stop string of {longest} characters is too long; each may have at most "
                 f"{MAX_STOP_LENGTH}")
        return tuple(strings), ()
    _require(len(ids) == len(items), "sampling_params.stop must be strings or token ids, "
                                     "not both")
    return (), tuple(ids)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _check_sample_fits(spec: SampleSpec, info: ModelInfo) -> None:
    bad = [t for t in spec.prompt if t < 0 or t >= info.vocab_size]
    _require(not bad, f"prompt token id {bad[0] if bad else 0} is outside the vocabulary "
                      f"[0, {info.vocab_size}) of {info.name}")
    bad_stop = [t for t in spec.stop_token_ids or () if t < 0 or t >= info.vocab_size]
    _require(not bad_stop, f"stop token id {bad_stop[0] if bad_stop else 0} is outside the "
                           f"vocabulary of {info.name}")
    _require(len(spec.prompt) + spec.max_tokens <= info.max_context,
             f"prompt ({len(spec.prompt)} tokens) + max_tokens ({spec.max_tokens}) exceed the "
             f"context of {info.name} ({info.max_context})")


def encode_sample_result(result: SampleResult) -> bytes:
    resp = pb.SampleResponse()
    for seq in result.sequences:
        out = resp.sequences.add()
        out.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        out.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
        out.stop_reason = pb.STOP_REASON_STOP if seq.stopped else pb.STOP_REASON_LENGTH
        if seq.topk is not None:
            _fill_topk(out.topk_sampled_logprobs, seq.topk)
    if result.prompt_logprobs is not None:
        values = [math.nan if x is None else x for x in result.prompt_logprobs]
        resp.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        _fill_topk(resp.topk_prompt_logprobs, result.topk_prompt_logprobs)
    return resp.SerializeToString()


def _fill_topk(target: pb.TopkLogprobs, rows: list[list[tuple[int, float]]] | list[Any]) -> None:
    k = max((len(r) for r in rows if r), default=0)
    ids = np.full((len(rows), k), TOPK_SENTINEL[0], dtype="<i4")
    lps = np.full((len(rows), k), TOPK_SENTINEL[1], dtype="<f4")
    for i, row in enumerate(rows):
        for j, (tok, lp) in enumerate(row or ()):
            ids[i, j], lps[i, j] = tok, lp
    target.token_ids, target.logprobs = ids.tobytes(), lps.tobytes()
    target.k, target.length = k, len(rows)
