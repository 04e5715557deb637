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

from engine.backend import ForwardBackwardResult, SampleResult
from engine.errors import BodyTooLarge, UserInputError
from engine.sizes import MAX_BODY_BYTES as MAX_BODY_BYTES  # re-exported
from engine.sizes import MAX_DECOMPRESSED_BYTES
from engine.values import (
    INT_INPUTS,
    MAX_TARGET_CANDIDATES,
    ModelInfo,
    SampleSpec,
    TrainingDatum,
    check_data_fits,
    check_loss_fn,
    check_loss_inputs,
    require,
    resolve_config,
)

_ZSTD_CHUNK = 1024 * 1024
DEFAULT_MAX_TOKENS = 128
TOPK_SENTINEL = (0, -99999.0)

_NP_DTYPES = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_INT64: "<i8"}


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
    """Parse a (decompressed) protobuf ForwardBackwardRequest into validated values (the
    loss, its resolved config, the datums and the inputs the loss needs). With `info`, the
    token ids and lengths are also checked against the base model."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserInputError(f"malformed protobuf ForwardBackwardRequest: {exc}") from exc
    loss_fn = check_loss_fn(msg.loss_fn)
    require(bool(msg.model_id), "model_id is required")
    call = ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=loss_fn,
        loss_config=resolve_config(loss_fn, _raw_loss_config(msg)),
        forward_only=bool(msg.forward_only),
        data=[_decode_datum(i, d) for i, d in enumerate(msg.data)],
    )
    check_loss_inputs(call.data, loss_fn)
    if info is not None:
        check_data_fits(call.data, info)
    return call


def _raw_loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key, value in msg.loss_fn_config_v2.items():
        raw[key] = value.number if value.WhichOneof("value") == "number" else value.text
    return raw or dict(msg.loss_fn_config)


def _decode_datum(index: int, datum: pb.Datum) -> TrainingDatum:
    tokens: list[int] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        require(kind == "encoded_text",
                f"datum {index}: {kind} chunks are not supported; this server is text-only")
        raw = chunk.encoded_text.tokens
        require(len(raw) % 4 == 0, f"datum {index}: token bytes are not packed int32")
        tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
    require(bool(tokens), f"datum {index}: model_input is empty")
    inputs = {name: _tensor(index, name, t, len(tokens))
              for name, t in datum.loss_fn_inputs.items()}
    try:
        return TrainingDatum(tokens=np.asarray(tokens, dtype=np.int64), loss_inputs=inputs)
    except UserInputError as exc:
        raise UserInputError(f"datum {index}: {exc}") from exc


def _tensor(index: int, name: str, t: pb.Tensor, n: int) -> np.ndarray:
    """The protobuf tensor's bytes as an array of the dtype the input must have; its shape
    and values are the datum's to check. A sparse CSR tensor (the SDK sends 2-D
    target_tokens/weights that way when it is smaller; unlisted entries are 0) is
    densified only once its shape is known to be (n, K) with K within the limit, n being
    the datum's token count, so a declared shape cannot make it allocate more."""
    want = "<i8" if name in INT_INPUTS else "<f4"
    kind = "int64" if want == "<i8" else "float32"
    what = f"datum {index}: loss_fn_inputs[{name!r}]"
    require(_NP_DTYPES.get(t.dtype) == want, f"{what} must be {kind}")
    shape = [int(s) for s in t.shape]
    if t.WhichOneof("encoding") == "sparse_csr":
        return _sparse_csr(what, t.sparse_csr, shape, want, n)
    itemsize = np.dtype(want).itemsize
    count = len(t.dense) // itemsize
    require(len(t.dense) % itemsize == 0 and all(d >= 0 for d in shape)
            and int(np.prod(shape)) == count,
            f"{what} has {len(t.dense)} bytes of {kind}, which do not fill shape {shape}")
    return np.frombuffer(t.dense, dtype=want).copy().reshape(shape)


def _sparse_csr(what: str, csr: pb.SparseCsr, shape: list[int], want: str, n: int
                ) -> np.ndarray:
    require(len(shape) == 2 and shape[0] == n and 1 <= shape[1] <= MAX_TARGET_CANDIDATES,
            f"{what} is sparse with shape {shape}; a sparse input must be 2-D (N, K) with N = "
            f"{n} (the datum's tokens) and 1 <= K <= {MAX_TARGET_CANDIDATES}")
    bad = f"{what} is malformed sparse CSR"
    itemsize = np.dtype(want).itemsize
    require(len(csr.values) % itemsize == 0 and len(csr.crow_indices) % 8 == 0
            and len(csr.col_indices) % 8 == 0, f"{bad}: byte lengths do not fit their dtypes")
    values = np.frombuffer(csr.values, dtype=want)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    nnz = len(values)
    require(len(crow) == n + 1 and len(col) == nnz and nnz <= n * shape[1],
            f"{bad}: {len(crow)} row pointers and {len(col)} column indices for {nnz} values "
            f"and {n} rows")
    require(crow[0] == 0 and crow[-1] == nnz and bool(np.all(np.diff(crow) >= 0)),
            f"{bad}: row pointers must rise from 0 to the number of values")
    require(bool(np.all((col >= 0) & (col < shape[1]))),
            f"{bad}: a column index is outside [0, {shape[1]})")
    dense = np.zeros(shape, dtype=want)
    rows = np.repeat(np.arange(n), np.diff(crow))
    dense[rows, col] = values
    return dense


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
        # Stability information feeds only stable_reinforce, which is refused.
        ("record_stability_info", bool(req.record_stability_info)),
    ):
        if unsupported:
            raise UserInputError(f"{field_name} is not supported by this server")
    spec = _sample_spec(req, _prompt_tokens(req.prompt))
    if info is not None:
        spec.check_fits(info)
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
    return tuple(tokens)


def _sample_spec(req: tt.SampleRequest, prompt: tuple[int, ...]) -> SampleSpec:
    params = req.sampling_params
    stop_strings, stop_ids = _stop_sequences(params.stop)
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    return SampleSpec(
        prompt=prompt, num_samples=req.num_samples, max_tokens=max_tokens,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        seed=params.seed, stop_strings=stop_strings, stop_token_ids=stop_ids,
        prompt_logprobs=bool(req.prompt_logprobs),
        topk_prompt_logprobs=req.topk_prompt_logprobs,
        topk_sample_logprobs=req.topk_sample_logprobs)


def _stop_sequences(stop: Any) -> tuple[tuple[str, ...] | None, tuple[int, ...] | None]:
    """(stop strings, stop token ids), one kind or the other; (None, None) for the model's
    default (EOS). Their count and lengths are SampleSpec's to check."""
    if stop is None:
        return None, None
    items = [stop] if isinstance(stop, str) else list(stop)
    if all(isinstance(s, str) for s in items):
        return tuple(items), ()
    require(all(isinstance(s, int) and not isinstance(s, bool) for s in items),
            "sampling_params.stop must be strings or token ids, not both")
    return (), tuple(int(s) for s in items)


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
