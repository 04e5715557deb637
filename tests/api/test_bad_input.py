"""Bad input gets a clear, fast user error and changes nothing.

Each refusal reaches the SDK user as a non-retried error naming what to fix, in well
under the SDK's retry horizon, and the training run's weights are unchanged after it.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.api.helpers import TEXTS, TINY, rest, service, sft_datum

FAST_SECONDS = 3.0




def _loss(trainer) -> float:
    tok = trainer.get_tokenizer()
    return trainer.forward([sft_datum(tok, TEXTS[0])], "cross_entropy").result().metrics[
        "loss:sum"]


def _refused_fast(call, error=tinker.BadRequestError, match: str | None = None):
    start = time.monotonic()
    with pytest.raises(error, match=match) as info:
        call()
    assert time.monotonic() - start < FAST_SECONDS, "refusal was retried or slow"
    return info.value


@pytest.mark.parametrize("loss_fn, message", [
    ("custom", "no user code"),
    ("stable_reinforce", "'stable_reinforce' is not supported.*record_stability_info"),
    ("not-a-loss", "unknown loss_fn"),
])
def test_unsupported_loss_functions_are_refused(trainer, loss_fn, message):
    before = _loss(trainer)
    datum = sft_datum(trainer.get_tokenizer(), TEXTS[0])
    _refused_fast(lambda: trainer.forward_backward([datum], loss_fn).result(), match=message)
    assert _loss(trainer) == pytest.approx(before, rel=1e-7)


def test_image_chunks_are_refused(trainer):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    image = types.ImageChunk(data=b"\x89PNG fake", format="png", expected_tokens=2)
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[image, types.EncodedTextChunk(tokens=ids[:-1])]),
        loss_fn_inputs={"target_tokens": [0, 0, *ids[1:]], "weights": [1.0] * (len(ids) + 1)})
    _refused_fast(lambda: trainer.forward_backward([datum], "cross_entropy").result(),
                  match="text-only")


def _datum(ids, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)


@pytest.mark.parametrize("case, message", [
    ("targets_too_long", "has length"),
    ("weights_int64", "must be float32"),
    ("targets_float", "must be int64"),
    ("targets_2d", "one weight per target"),
    ("missing_targets", "needs loss_fn_inputs"),
    ("extra_input", "not used by cross_entropy"),
    ("nan_weights", "NaN"),
    ("rl_without_advantages", "needs loss_fn_inputs"),
])
def test_malformed_tensors_are_refused(trainer, case, message):
    ids = trainer.get_tokenizer().encode(TEXTS[1])
    n = len(ids) - 1
    loss_fn = "cross_entropy"
    inputs = {
        "targets_too_long": {"target_tokens": [*ids[1:], 1], "weights": [1.0] * n},
        "weights_int64": {"target_tokens": ids[1:], "weights": np.ones(n, dtype=np.int64)},
        "targets_float": {"target_tokens": np.ones(n, dtype=np.float32), "weights": [1.0] * n},
        "targets_2d": {"target_tokens": np.ones((n, 2), dtype=np.int64), "weights": [1.0] * n},
        "missing_targets": {"weights": [1.0] * n},
        "extra_input": {"target_tokens": ids[1:], "weights": [1.0] * n, "advantages": [0.0] * n},
        "nan_weights": {"target_tokens": ids[1:], "weights": [float("nan")] * n},
        "rl_without_advantages": {"target_tokens": ids[1:], "logprobs": [0.0] * n},
    }[case]
    if case == "rl_without_advantages":
        loss_fn = "ppo"
    before = _loss(trainer)
    _refused_fast(lambda: trainer.forward_backward([_datum(ids, **inputs)], loss_fn).result(),
                  match=message)
    assert _loss(trainer) == pytest.approx(before, rel=1e-7)


@pytest.mark.parametrize("where", ["model_input", "target_tokens"])
def test_token_ids_outside_the_vocabulary_are_refused(trainer, where):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    vocab = len(tok)
    model_input, targets = list(ids[:-1]), list(ids[1:])
    (model_input if where == "model_input" else targets)[1] = vocab + 7
    datum = types.Datum(model_input=types.ModelInput.from_ints(model_input),
                        loss_fn_inputs={"target_tokens": targets,
                                        "weights": [1.0] * len(targets)})
    before = _loss(trainer)
    _refused_fast(lambda: trainer.forward_backward([datum], "cross_entropy").result(),
                  match="outside the vocabulary")
    assert _loss(trainer) == pytest.approx(before, rel=1e-7)


def test_sampling_prompt_outside_the_vocabulary_is_refused(client):
    sampler = client.create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints([1, 2, 10**6])
    _refused_fast(lambda: sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(),
                  match="outside the vocabulary")


@pytest.mark.parametrize("rank, message", [(0, "at least 1"), (65, "exceeds the maximum")])
def test_lora_rank_must_be_within_limits(client, rank, message):
    _refused_fast(lambda: client.create_lora_training_client(base_model=TINY, rank=rank)
                  .result(), match=message)


def test_unknown_base_model_is_refused(client):
    _refused_fast(lambda: client.create_lora_training_client(base_model="no/such-model", rank=4)
                  .result(), match="unknown base model")


def _raw_post(server, key: str, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/{path}", content=content,
                      headers={"X-API-Key": key, **headers}, timeout=10)


def test_malformed_protobuf_gets_a_400_with_a_message(server, api_key):
    resp = _raw_post(server, api_key, "forward_backward", b"\xff\xff\xff garbage",
                     **{"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 400
    assert "malformed protobuf" in resp.json()["detail"]


def test_unsupported_content_encoding_gets_a_400(server, api_key):
    body = pb.ForwardBackwardRequest(model_id="x", seq_id=1).SerializeToString()
    resp = _raw_post(server, api_key, "forward_backward", body,
                     **{"Content-Encoding": "br", "Content-Type": "application/x-protobuf"})
    assert resp.status_code == 400 and "Content-Encoding" in resp.json()["detail"]


def test_malformed_json_gets_a_422(server, api_key):
    resp = _raw_post(server, api_key, "create_model", b"{not json",
                     **{"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"]


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "x/../../y", ".hidden", ""])
def test_checkpoint_names_that_could_escape_are_refused(trainer, name):
    error = tinker.BadRequestError
    _refused_fast(lambda: trainer.save_state(name).result(), error, match="checkpoint name|path")


def test_unknown_and_missing_keys_get_401(server):
    for headers in ({"X-API-Key": "tml-not-a-real-key"}, {}):
        resp = httpx.post(f"{server.base_url}/api/v1/client/config", json={},
                          headers=headers, timeout=10)
        assert resp.status_code == 401
        assert "API key" in resp.json()["detail"]
    with pytest.raises(tinker.AuthenticationError):
        rest(server, "tml-not-a-real-key").list_training_runs().result()


def _latest_future_of(server, model_id: str) -> str:
    from sqlalchemy import select

    from audit.db import transaction
    from audit.models import Future

    with transaction(server.state.read_factory) as session:
        return session.scalars(select(Future.request_id).where(Future.model_id == model_id)
                               .order_by(Future.seq_id.desc())).first()


def test_another_principals_objects_are_not_found(server, client, trainer):
    """Runs, checkpoints, samplers, futures and sessions of someone else are 404."""
    tok = trainer.get_tokenizer()
    path = trainer.save_state("private").result().path
    sampler_path = trainer.save_weights_for_sampler("private-s").result().path
    sampler = client.create_sampling_client(model_path=sampler_path).result()
    run_id = trainer.get_info().model_id
    trainer.forward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    future_id = _latest_future_of(server, run_id)

    intruder_key = server.create_key()
    other = rest(server, intruder_key)
    with pytest.raises(tinker.NotFoundError):
        other.get_training_run(run_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        other.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_sampler(sampler._sampling_session_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_session(run_id.split(":")[0]).result()
    assert other.list_training_runs().result().training_runs == []

    intruder = service(server, intruder_key)
    with pytest.raises(tinker.NotFoundError):
        intruder.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        intruder.create_sampling_client(model_path=sampler_path).result()
    for route, body in [
        ("get_info", {"model_id": run_id}),
        ("optim_step", {"model_id": run_id, "seq_id": 99, "adam_params": {
            "learning_rate": 1.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
            "weight_decay": 0.0, "grad_clip_norm": 0.0}}),
        ("asample", {"sampling_session_id": sampler._sampling_session_id, "seq_id": 0,
                     "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text",
                                                              "tokens": [1, 2]}]},
                     "sampling_params": {"max_tokens": 2}}),
        ("retrieve_future", {"request_id": future_id}),
    ]:
        resp = httpx.post(f"{server.base_url}/api/v1/{route}", json=body,
                          headers={"X-API-Key": intruder_key}, timeout=10)
        assert resp.status_code == 404, (route, resp.text)
    intruder.close("success").result()
    assert rest(server, server.create_key()).list_user_checkpoints().result().checkpoints == []
    # The owner still has everything.
    assert trainer.get_info().model_id == run_id


def test_an_oversized_body_is_refused_before_it_is_read(server, api_key):
    import json
    import socket
    from urllib.parse import urlparse

    from engine.wire import MAX_BODY_BYTES

    url = urlparse(server.base_url)
    head = (f"POST /api/v1/forward_backward HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"X-API-Key: {api_key}\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"x" * 1024)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line
    assert "exceeds the limit" in json.loads(rest.partition(b"\r\n\r\n")[2])["detail"]
