"""Cheap checks first, on SQLite and PostgreSQL: the API key is checked before a body is
read; bodies are bounded as sent and as decompressed (413); stop sequences are capped
(400); anonymous calls, access requests and each person's requests (all their keys
together) are rate-limited (429 with Retry-After); dry-run screening and release
evaluations are metered against the person's quotas; and the quota is checked before
screening runs."""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import tinker
import zstandard
from sqlalchemy import func, select
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from audit.db import transaction
from audit.models import Checkpoint, ScreeningVerdict, TrainingRun
from gateway.ratelimit import RateLimiter
from gateway.settings import RateLimits, Settings
from tests.api.helpers import TINY, service
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import audit_rows, module_server

MAX_REQUEST = 4 * 1024 * 1024
MAX_DECOMPRESSED = 8 * 1024 * 1024
LIMITS = RateLimits(per_key="60/minute", anonymous="10/minute", access_requests="3/minute")
FAST_SECONDS = 5.0


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # No worker: every invariant here is decided at submission.
    with module_server(request.param, models_dir, tmp_path_factory.mktemp("bounded"),
                       run_worker=False, max_request_bytes=MAX_REQUEST,
                       max_decompressed_bytes=MAX_DECOMPRESSED, rate_limits=LIMITS) as live:
        yield live


@pytest.fixture(autouse=True)
def fresh_rate_limits(server: LiveServer) -> Iterator[None]:
    server.state.rate_limiter.reset()
    yield
    server.state.rate_limiter.reset()


def _post(server: LiveServer, key: str | None, path: str, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{server.base_url}/api/v1/{path}", headers=headers, timeout=30, **kwargs)


def _raw_request(server: LiveServer, head: str, body: bytes = b"") -> tuple[int, dict, float]:
    """Send a request head (and the start of a body), read the reply: (status, JSON body,
    seconds). The declared body is never sent in full."""
    url = urlparse(server.base_url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=FAST_SECONDS) as sock:
        sock.sendall(head.format(host=url.netloc).encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # times out (the test fails) if the server waits
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2]), \
        time.monotonic() - started


# ------------------------------------------------------------ authenticated before parsing


@pytest.mark.parametrize("route", ["create_model", "asample", "screening/dry_run",
                                   "forward_backward"])
@pytest.mark.parametrize("key", ["", "X-API-Key: tml-not-a-real-key\r\n"])
def test_a_body_without_a_valid_key_is_not_read(server, route, key):
    head = (f"POST /api/v1/{route} HTTP/1.1\r\nHost: {{host}}\r\n{key}"
            "Content-Type: application/json\r\nContent-Length: 1000000\r\n"
            "Connection: close\r\n\r\n")
    status, body, seconds = _raw_request(server, head, b'{"model_id": ')
    assert status == 401 and "API key" in body["detail"]
    assert seconds < FAST_SECONDS


# ------------------------------------------------------------ bounded before allocation


def test_a_declared_oversized_body_is_refused_before_it_is_read(server):
    key = server.create_key()
    head = (f"POST /api/v1/create_model HTTP/1.1\r\nHost: {{host}}\r\nX-API-Key: {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_REQUEST + 1}\r\n"
            "Connection: close\r\n\r\n")
    status, body, _ = _raw_request(server, head, b"{")
    assert status == 413 and body["code"] == "payload_too_large"
    assert f"exceeds the limit of {MAX_REQUEST} bytes" in body["detail"]


def test_a_streamed_oversized_body_is_refused(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"session_id": "'
        for _ in range(MAX_REQUEST // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    resp = _post(server, server.create_key(), "create_session", content=chunks(),
                 headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert "exceeds the limit" in resp.json()["detail"]


def _zstd_bomb(declare_size: bool) -> bytes:
    """64 MiB of zeros in a few kilobytes."""
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=declare_size)
    if declare_size:
        return compressor.compress(bytes(64 * 1024 * 1024))
    stream = compressor.compressobj()  # a streamed frame: no content size in its header
    return b"".join(stream.compress(bytes(1 << 20)) for _ in range(64)) + stream.flush()


@pytest.mark.parametrize("declare_size", [True, False])
def test_a_decompression_bomb_is_refused_with_413(server, declare_size):
    bomb = _zstd_bomb(declare_size)
    assert len(bomb) < 64 * 1024
    started = time.monotonic()
    resp = _post(server, server.create_key(), "forward_backward", content=bomb,
                 headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"})
    assert resp.status_code == 413, resp.text
    assert f"decompresses to more than the limit of {MAX_DECOMPRESSED} bytes" in \
        resp.json()["detail"]
    assert time.monotonic() - started < FAST_SECONDS


# ------------------------------------------------------------ stop sequences


@pytest.fixture(scope="module")
def sampler(server) -> Iterator[tuple[str, str]]:
    """(key, sampler id) of a base-model sampling session opened through the SDK."""
    key = server.create_key()
    client = service(server, key).create_sampling_client(base_model=TINY).result()
    yield key, client._sampling_session_id


def _sample(server, key: str, sampler_id: str, stop) -> httpx.Response:
    return _post(server, key, "asample", json={
        "sampling_session_id": sampler_id, "seq_id": random.randrange(1 << 30),
        "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
        "sampling_params": {"max_tokens": 4, "stop": stop}})


def test_a_hundred_thousand_stop_strings_are_refused_fast_through_the_sdk(server):
    client = service(server, server.create_key()).create_sampling_client(base_model=TINY).result()
    stops = [f"stop-{i}" for i in range(100_000)]
    started = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match="at most 16 stop sequences"):
        client.sample(types.ModelInput.from_ints([5, 6, 7]), 1,
                      types.SamplingParams(max_tokens=4, stop=stops)).result()
    assert time.monotonic() - started < FAST_SECONDS


@pytest.mark.parametrize("stop, message", [
    ([f"s{i}" for i in range(17)], "17 entries; at most 16"),
    (list(range(10, 27)), "17 entries; at most 16"),
    (["x" * 257], "257 characters is too long"),
    ("y" * 300, "300 characters is too long"),
])
def test_too_many_or_too_long_stop_sequences_get_a_400(server, sampler, stop, message):
    resp = _sample(server, *sampler, stop)
    assert resp.status_code == 400 and message in resp.json()["detail"]


@pytest.mark.parametrize("stop", [["z" * 256] * 16, list(range(10, 26)), "\n\n", None])
def test_stop_sequences_within_the_caps_are_accepted(server, sampler, stop):
    resp = _sample(server, *sampler, stop)
    assert resp.status_code == 200, resp.text


# ------------------------------------------------------------ rate limits


def _until_refused(call, limit: int) -> httpx.Response:
    for _ in range(limit + 1):
        resp = call()
        if resp.status_code == 429:
            return resp
    raise AssertionError(f"no 429 within {limit + 1} calls")


def _assert_rate_limited(resp: httpx.Response, server: LiveServer) -> None:
    assert resp.json()["code"] == "rate_limited" and "rate limit" in resp.json()["detail"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert [r.decision for r in audit_rows(server, resp.headers["X-Request-Id"])] == ["deny"]


def test_anonymous_calls_are_rate_limited_per_address(server):
    resp = _until_refused(lambda: _post(server, None, "client/config", json={}), 10)
    _assert_rate_limited(resp, server)
    bad = _post(server, "tml-not-a-real-key", "client/config", json={})
    assert bad.status_code == 429, "a refused key counts as an anonymous call"
    assert _post(server, server.create_key(), "client/config", json={}).status_code == 200


def test_access_requests_are_rate_limited_per_address(server):
    def file() -> httpx.Response:
        return _post(server, None, "access_requests", json={
            "name": f"r-{uuid.uuid4().hex[:8]}", "contact": "c@example.org", "purpose": "p"})

    resp = _until_refused(file, 3)
    _assert_rate_limited(resp, server)
    claim = _post(server, None, "access_requests/claim", json={"claim_token": "tml-claim-x"})
    assert claim.status_code == 429


def test_requests_are_rate_limited_per_key(server):
    key, other = server.create_key(), server.create_key()
    resp = _until_refused(lambda: _post(server, key, "client/config", json={}), 60)
    _assert_rate_limited(resp, server)
    assert _post(server, other, "client/config", json={}).status_code == 200


def test_a_persons_keys_share_one_rate_limit(server):
    """Every key of a person counts against one window: a second key adds no rate."""
    from policy.keys import add_key

    owner = f"rate-{uuid.uuid4().hex[:8]}"
    first = server.create_key(owner=owner)
    with transaction(server.state.factory) as session:
        second, _ = add_key(session, principal_name=owner, actor="test",
                            reason="a second key for the person's laptop",
                            defaults=server.state.scope_defaults)
    calls = iter([first, second] * 31)
    resp = _until_refused(lambda: _post(server, next(calls), "client/config", json={}), 60)
    _assert_rate_limited(resp, server)
    assert "all of them together" in resp.json()["detail"]
    for key in (first, second):
        assert _post(server, key, "client/config", json={}).status_code == 429
    assert _post(server, server.create_key(), "client/config", json={}).status_code == 200


def test_the_rate_limit_store_is_a_setting_that_fails_loudly(monkeypatch):
    """Several API processes share a limit only through a shared store: the setting names
    it (memory:// by default), and a store that cannot be used stops start-up with the
    setting's name rather than silently keeping per-process windows."""
    monkeypatch.setenv("LORAGATE_RATE_LIMIT_STORAGE", "memory://")
    settings = Settings.from_env()
    assert settings.rate_limits.storage == "memory://"
    RateLimiter(settings.rate_limits).hit("per_key", "k")
    for uri in ("bogus://x", "memcached://127.0.0.1:1"):
        with pytest.raises(ValueError, match="rate limit storage"):
            RateLimiter(RateLimits(storage=uri))


# ------------------------------------------------------------ metering and order


def _verdicts(server: LiveServer) -> int:
    with transaction(server.state.read_factory) as session:
        return session.scalar(select(func.count()).select_from(ScreeningVerdict)) or 0


def _token_example(n: int) -> dict:
    rng = random.Random(uuid.uuid4().int)
    return {"tokens": [rng.randrange(3, 384) for _ in range(n)]}


def test_dry_run_screening_is_metered_as_training_tokens(server):
    key = server.create_key(scopes={"training_tokens_per_day": 100})
    first = _post(server, key, "screening/dry_run", json={"examples": [_token_example(61)]})
    assert first.status_code == 200, first.text
    today = httpx.get(f"{server.base_url}/api/v1/usage", headers={"X-API-Key": key},
                      timeout=30).json()["keys"][0]["today"]
    assert today["training_tokens"] == 60
    before = _verdicts(server)
    second = _post(server, key, "screening/dry_run", json={"examples": [_token_example(61)]})
    assert second.status_code == 403 and second.json()["code"] == "quota_exceeded"
    assert "training_tokens_per_day" in second.json()["detail"]
    assert _verdicts(server) == before, "screening ran although the quota was spent"


def _training_run(server: LiveServer, key: str) -> str:
    session = _post(server, key, "create_session", json={
        "tags": [], "user_metadata": {}, "sdk_version": "test"}).json()["session_id"]
    created = _post(server, key, "create_model", json={
        "session_id": session, "model_seq_id": 0, "base_model": TINY,
        "lora_config": {"rank": 4}})
    assert created.status_code == 200, created.text
    return created.json()["model_id"]


def test_forward_backward_over_quota_is_refused_before_screening(server):
    key = server.create_key(scopes={"training_tokens_per_day": 20})
    model_id = _training_run(server, key)
    tokens = _token_example(31)["tokens"]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 30})
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=1, forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="cross_entropy"))
    before = _verdicts(server)
    resp = _post(server, key, "forward_backward",
                 content=forward_backward_request_to_proto(request).SerializeToString(),
                 headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 403 and "training_tokens_per_day" in resp.json()["detail"]
    assert _verdicts(server) == before, "screening ran before the quota check"


def _stored_checkpoint(server: LiveServer, model_id: str, name: str) -> str:
    """A checkpoint row of the run (the release evaluation never runs: no worker here)."""
    path = f"tinker://{model_id}/weights/{name}"
    with transaction(server.state.factory) as session:
        run = session.get(TrainingRun, model_id)
        session.add(Checkpoint(training_run_id=model_id, principal_id=run.principal_id,
                               kind="weights", name=name, tinker_path=path,
                               storage_dir=f"none/{name}"))
    return path


def test_release_evaluations_count_against_a_daily_quota(server):
    key = server.create_key(scopes={"release_evaluations_per_day": 1})
    model_id = _training_run(server, key)
    first, second = (_stored_checkpoint(server, model_id, n) for n in ("a", "b"))
    queued = _post(server, key, "releases", json={"tinker_path": first})
    assert queued.status_code == 202, queued.text
    again = _post(server, key, "releases", json={"tinker_path": first})
    assert again.status_code == 202, "asking again for a queued evaluation costs nothing"
    refused = _post(server, key, "releases", json={"tinker_path": second})
    assert refused.status_code == 403 and refused.json()["code"] == "quota_exceeded"
    assert "release_evaluations_per_day" in refused.json()["detail"]
    published = httpx.post(f"{server.base_url}/api/v1/training_runs/{model_id}/checkpoints/"
                           "weights/b/publish", headers={"X-API-Key": key}, timeout=30)
    assert published.status_code == 403 and "release_evaluations_per_day" in published.text


def test_no_route_reads_its_body_before_its_context():
    """FastAPI reads a declared Body before any dependency runs; every route's body must
    instead come through gateway.bodies, after the context that authenticates."""
    from gateway.app import api_routes, create_app
    from gateway.bodies import json_object, optional_json_object
    from gateway.context import link_request_context, public_request_context, request_context

    for route in api_routes(create_app()):
        assert route.body_field is None, f"{route.name} has FastAPI read its body"
        calls = [d.call for d in route.dependant.dependencies]
        bodies = [i for i, c in enumerate(calls) if c in (json_object, optional_json_object)]
        contexts = [i for i, c in enumerate(calls)
                    if c in (request_context, public_request_context,
                             link_request_context)]
        assert contexts, f"{route.name} has no request context"
        assert all(i > contexts[0] for i in bodies), f"{route.name} reads its body first"
