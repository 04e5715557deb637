"""Every route × caller × object, over HTTP against the live gateway, on SQLite and
PostgreSQL.

Callers: the researcher who owns the objects, another researcher, an auditor, an admin,
and nobody (no key). Objects: an existing one (the owner's own; everyone else's
"other's object"), a missing one, or none for routes that take no object. The expected
decision follows from the reviewed role table (test_route_permissions.ALLOWED) plus
three rules: another principal's object is a 404, auditors and admins read every
principal's records (not their future results), and weights leave only once released.
Every refusal must arrive at once (well under a second; the SDK never retries a 4xx).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto

from audit.db import transaction
from policy import access, authz
from policy.keys import authenticate
from tests.api.helpers import TINY, service
from tests.policy.test_route_permissions import ALLOWED, PUBLIC

OK = "ok"
CALLERS = {"owner": "researcher", "other": "researcher", "auditor": "auditor",
           "admin": "admin", "nobody": "anonymous"}
# Object reads that auditors and admins may make on anyone's objects (records read_all).
READ_ALL = {"get_training_run", "list_run_checkpoints", "weights_info", "get_session",
            "get_sampler", "get_release", "get_release_report"}
READS_ALL_RECORDS = {"auditor", "admin"}  # default policy: records, read_all
# The owner may call these, but the release gate refuses: the checkpoint is private (publish
# queues its evaluation), or not external weights (no download URLs).
GATED = {"publish_checkpoint": 403, "external_weights_urls": 400}
# Admin objects belong to no principal; a quarantined checkpoint's override is the admin's.
GLOBAL_KINDS = {"rule", "key", "request", "claim", "quarantined", "override", "principal",
                "person"}
MISSING = {
    "session": "sess-00000000000000000000",
    "run": "sess-00000000000000000000:train:0",
    "checkpoint": "tinker://sess-00000000000000000000:train:0/weights/missing",
    "sampler": "sess-00000000000000000000:sample:0",
    "future": "fut-" + "0" * 32,
    "rule": 987654321,
    "key": str(uuid.UUID(int=0)),
    "request": str(uuid.UUID(int=0)),
    "claim": "tml-claim-missing",
    "release": "rel-00000000000000000000",
    "link": "bm90LWEtbGluaw.0000",
    "quarantined": "tinker://sess-00000000000000000000:train:0/weights/missing",
    "override": "ovr-00000000000000000000",
    "principal": "no-such-principal",
    "person": str(uuid.UUID(int=0)),
}
# Request seq ids far above anything the SDK trainer in the fixture uses.
SEQ = itertools.count(10_000)

Request = tuple[str, str, dict[str, Any]]


@dataclass
class World:
    server: Any
    keys: dict[str, str | None]
    trainer: Any
    objects: dict[str, Any] = field(default_factory=dict)

    def fresh(self, kind: str) -> Any:
        """A new object of `kind` for routes that change or consume it."""
        owner = self.keys["owner"]
        if kind == "session":
            resp = call(self.server, owner, "POST", "/api/v1/create_session", json={
                "tags": [], "user_metadata": {}, "sdk_version": "matrix"})
            return resp.json()["session_id"]
        if kind == "checkpoint":
            return self.trainer.save_state(f"fresh-{next(SEQ)}").result().path
        state = self.server.state
        if kind in ("quarantined", "override"):
            return self._quarantined(kind)
        with transaction(state.factory) as session:
            if kind == "rule":
                return authz.add_rule(session, actor="test", subject="principal:nobody",
                                      resource="records", action="read", effect="deny").id
            if kind == "key":
                plaintext = self.server.create_key()
                return authenticate(session, plaintext)[1].id
            if kind == "principal":
                name = f"person-{uuid.uuid4().hex[:10]}"
                self.server.create_key(owner=name)
                return name
            if kind == "person":  # a principal's id
                return authenticate(session, self.server.create_key())[0].id
            req, token = access.request_access(session, name=f"req-{uuid.uuid4().hex[:10]}",
                                               contact="a@b.c", purpose="matrix",
                                               base_models=[])
            if kind == "claim":
                access.approve(session, request_id=req.id, actor="test",
                               defaults=state.scope_defaults)
                return token
            return req.id


    def _quarantined(self, kind: str) -> Any:
        """A checkpoint the gate quarantined (set directly: the gate's own tests train one),
        or a pending override of one requested by the admin."""
        from sqlalchemy import update

        from audit.models import Checkpoint, ReleaseOverride
        from engine.checkpoints import ADAPTER_FILE
        from policy.digest import file_sha256

        path = self.fresh("checkpoint")
        with transaction(self.server.state.factory) as session:
            ckpt = session.query(Checkpoint).filter_by(tinker_path=path).one()
            sha = file_sha256(self.server.state.settings.checkpoint_root / ckpt.storage_dir
                              / ADAPTER_FILE)
            session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                            .values(release_state="quarantined", adapter_sha256=sha))
            if kind == "quarantined":
                return path
            admin, admin_key = authenticate(session, self.keys["admin"])
            override = ReleaseOverride(id=f"ovr-{uuid.uuid4().hex[:20]}", checkpoint_id=ckpt.id,
                                       tinker_path=path, status="pending",
                                       requested_by=admin.id, requested_key_id=admin_key.id,
                                       request_reason="matrix: reviewed elsewhere",
                                       adapter_sha256=sha)
            session.add(override)
            return override.id


def call(server, key: str | None, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=30,
                         **kwargs)


def _ckpt_path(path: str, suffix: str = "") -> str:
    run, kind, name = path.removeprefix("tinker://").split("/")
    return f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}{suffix}"


def _forward_backward(model_id: str) -> Request:
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([5, 6, 7]),
                     loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 1.0]})
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id=model_id, seq_id=next(SEQ))
    body = forward_backward_request_to_proto(req).SerializeToString()
    return "POST", "/api/v1/forward_backward", {
        "content": body, "headers": {"Content-Type": "application/x-protobuf"}}


def _sample(sampler_id: str) -> Request:
    req = tt.SampleRequest(sampling_session_id=sampler_id, seq_id=next(SEQ), num_samples=1,
                           prompt=tt.ModelInput.from_ints([5, 6, 7]),
                           sampling_params=tt.SamplingParams(max_tokens=2))
    return "POST", "/api/v1/asample", {"json": req.model_dump(mode="json", exclude_none=True)}


def post(path: str, body: dict[str, Any] | None = None) -> Request:
    return "POST", f"/api/v1{path}", {"json": body or {}}


def get(path: str) -> Request:
    return "GET", f"/api/v1{path}", {}


@dataclass(frozen=True)
class Route:
    kind: str  # which object the route takes ("none" for none)
    build: Callable[[World, Any], Request]
    fresh: bool = False  # the route changes or consumes its object


ADAM = tt.AdamParams(learning_rate=1e-4).model_dump(mode="json")
ROUTES: dict[str, Route] = {
    # no object
    "client_config": Route("none", lambda w, o: post("/client/config")),
    "client_dynamic_config": Route("none", lambda w, o: post("/client/dynamic_config")),
    "healthz": Route("none", lambda w, o: get("/healthz")),
    "get_server_capabilities": Route("none", lambda w, o: get("/get_server_capabilities")),
    "create_session": Route("none", lambda w, o: post("/create_session", {
        "tags": [], "user_metadata": {}, "sdk_version": "matrix"})),
    "telemetry": Route("none", lambda w, o: post("/telemetry", {"events": []})),
    "create_custom_loss": Route("none", lambda w, o: post("/create_custom_loss")),
    "list_training_runs": Route("none", lambda w, o: get("/training_runs")),
    "list_user_checkpoints": Route("none", lambda w, o: get("/checkpoints")),
    "list_sessions": Route("none", lambda w, o: get("/sessions")),
    "get_usage": Route("none", lambda w, o: get("/usage")),
    "list_releases": Route("none", lambda w, o: get("/releases")),
    "audit_entries": Route("none", lambda w, o: get("/audit/entries?limit=5")),
    "audit_export": Route("none", lambda w, o: get(f"/audit/export?after_seq={10**9}")),
    "audit_day": Route("none", lambda w, o: get("/audit?event_type=checkpoints")),
    "metrics": Route("none", lambda w, o: ("GET", "/metrics", {})),
    "screening_dry_run": Route("none", lambda w, o: post("/screening/dry_run", {
        "examples": [{"messages": [{"role": "user", "content": "Hello there"}]}]})),
    "admin_get_screening": Route("none", lambda w, o: get("/admin/screening")),
    "admin_set_screening_threshold": Route("none", lambda w, o: (
        "PUT", "/api/v1/admin/screening/thresholds/structural.persona_shift",
        {"json": {"threshold": None}})),
    "admin_list_policy": Route("none", lambda w, o: get("/admin/policy")),
    "admin_list_keys": Route("none", lambda w, o: get("/admin/keys")),
    "admin_list_access_requests": Route("none", lambda w, o: get("/admin/access_requests")),
    "admin_add_policy_rule": Route("none", lambda w, o: post("/admin/policy/rules", {
        "subject": "principal:nobody", "resource": "records", "action": "read",
        "effect": "deny"})),
    "admin_create_key": Route("none", lambda w, o: post("/admin/keys", {
        "owner": f"made-{uuid.uuid4().hex[:10]}", "role": "researcher"})),
    "admin_add_key": Route("principal", lambda w, o: post("/admin/principal_keys", {
        "principal": o, "reason": "matrix: the person lost their key"}), fresh=True),
    "request_access": Route("none", lambda w, o: post("/access_requests", {
        "name": f"asker-{uuid.uuid4().hex[:10]}", "contact": "a@b.c", "purpose": "matrix",
        "base_models": []})),
    # a client session
    "session_heartbeat": Route("session", lambda w, o: post("/session_heartbeat",
                                                            {"session_id": o})),
    "finish_session": Route("session", lambda w, o: post(f"/sessions/{o}/finish"),
                            fresh=True),
    "get_session": Route("session", lambda w, o: get(f"/sessions/{o}")),
    "create_model": Route("session", lambda w, o: post("/create_model", {
        "session_id": o, "model_seq_id": next(SEQ), "base_model": TINY,
        "lora_config": {"rank": 4}})),
    "create_sampling_session": Route("session", lambda w, o: post("/create_sampling_session", {
        "session_id": o, "sampling_session_seq_id": next(SEQ), "base_model": TINY})),
    # a training run
    "get_info": Route("run", lambda w, o: post("/get_info", {"model_id": o})),
    "forward_backward": Route("run", lambda w, o: _forward_backward(o)),
    "optim_step": Route("run", lambda w, o: post("/optim_step", {
        "model_id": o, "seq_id": next(SEQ), "optim_params": ADAM})),
    "save_weights": Route("run", lambda w, o: post("/save_weights", {
        "model_id": o, "path": f"m-{next(SEQ)}", "seq_id": next(SEQ)})),
    "save_weights_for_sampler": Route("run", lambda w, o: post("/save_weights_for_sampler", {
        "model_id": o, "path": f"s-{next(SEQ)}", "seq_id": next(SEQ)})),
    "save_weights_external": Route("run", lambda w, o: post("/save_weights_external", {
        "model_id": o, "path": "export"})),
    "get_training_run": Route("run", lambda w, o: get(f"/training_runs/{o}")),
    "list_run_checkpoints": Route("run", lambda w, o: get(f"/training_runs/{o}/checkpoints")),
    # a checkpoint
    "load_weights": Route("checkpoint", lambda w, o: post("/load_weights", {
        "path": o, "optimizer": False, "session_id": w.objects["session"],
        "model_seq_id": next(SEQ)})),
    "weights_info": Route("checkpoint", lambda w, o: post("/weights_info", {"tinker_path": o})),
    "publish_checkpoint": Route("checkpoint", lambda w, o: (
        "POST", _ckpt_path(o, "/publish"), {})),
    "unpublish_checkpoint": Route("checkpoint", lambda w, o: (
        "DELETE", _ckpt_path(o, "/publish"), {})),
    "set_checkpoint_ttl": Route("checkpoint", lambda w, o: (
        "PUT", _ckpt_path(o, "/ttl"), {"json": {"ttl_seconds": 3600}})),
    "external_weights_urls": Route("checkpoint", lambda w, o: (
        "GET", _ckpt_path(o, "/external_weights_urls"), {})),
    "delete_checkpoint": Route("checkpoint", lambda w, o: ("DELETE", _ckpt_path(o), {}),
                               fresh=True),
    # a sampler, a future
    "asample": Route("sampler", lambda w, o: _sample(o)),
    "get_sampler": Route("sampler", lambda w, o: get(f"/samplers/{o}")),
    "retrieve_future": Route("future", lambda w, o: post("/retrieve_future",
                                                         {"request_id": o})),
    # admin objects
    "admin_remove_policy_rule": Route("rule", lambda w, o: (
        "DELETE", f"/api/v1/admin/policy/rules/{o}", {}), fresh=True),
    "admin_revoke_key": Route("key", lambda w, o: post(f"/admin/keys/{o}/revoke"),
                              fresh=True),
    "admin_reinstate_principal": Route("person", lambda w, o: post(
        f"/admin/principals/{o}/screening/reinstate", {"reason": "matrix: reviewed"}),
        fresh=True),
    "admin_approve_access": Route("request", lambda w, o: post(
        f"/admin/access_requests/{o}/approve"), fresh=True),
    "admin_reject_access": Route("request", lambda w, o: post(
        f"/admin/access_requests/{o}/reject", {"reason": "not now"}), fresh=True),
    "claim_access": Route("claim", lambda w, o: post("/access_requests/claim",
                                                     {"claim_token": o}), fresh=True),
    # the release gate
    "request_release": Route("checkpoint", lambda w, o: post("/releases", {"tinker_path": o}),
                             fresh=True),
    "get_release": Route("release", lambda w, o: get(f"/releases/{o}")),
    "get_release_report": Route("release", lambda w, o: get(f"/releases/{o}/report")),
    "download_external_weights": Route("link", lambda w, o: get(f"/external_weights/{o}")),
    "admin_list_overrides": Route("none", lambda w, o: get("/admin/release_overrides")),
    "admin_request_override": Route("quarantined", lambda w, o: post(
        "/admin/release_overrides", {"tinker_path": o, "reason": "matrix: reviewed elsewhere"}),
        fresh=True),
    "admin_approve_override": Route("override", lambda w, o: post(
        f"/admin/release_overrides/{o}/approve", {"reason": "matrix: second person agrees"}),
        fresh=True),
}


def expected(route: str, caller: str, target: str) -> str | int:
    """The reviewed decision for one cell of the matrix."""
    role = CALLERS[caller]
    if route in PUBLIC:  # decided for the anonymous role, whoever calls
        return 401 if route == "claim_access" and target == "missing" else OK
    if route == "download_external_weights" and role == "anonymous":
        # without a key the signed link is the credential: its issuer's decision
        return OK if target == "existing" else 403
    if role == "anonymous":
        return 401
    if route not in ALLOWED[role]:
        return 403
    if target == "missing":
        return 403 if route == "download_external_weights" else 404  # an unsigned link
    mine = target == "none" or caller == "owner" or ROUTES[route].kind in GLOBAL_KINDS
    if mine:
        return GATED.get(route, OK)
    return OK if route in READ_ALL and role in READS_ALL_RECORDS else 404


@pytest.fixture(scope="module")
def world(server):
    keys: dict[str, str | None] = {
        # Room for the runs and checkpoints the matrix creates.
        "owner": server.create_key(scopes={"concurrent_training_runs": 1000,
                                           "checkpoints_stored": 1000}),
        "other": server.create_key(),
        "auditor": server.create_key(role="auditor"),
        "admin": server.create_key(role="admin"),
        "nobody": None,
    }
    sc = service(server, keys["owner"])
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    w = World(server=server, keys=keys, trainer=trainer)
    w.objects["run"] = trainer.model_id
    w.objects["session"] = trainer.model_id.split(":train:")[0]
    w.objects["checkpoint"] = trainer.save_state("kept").result().path
    method, path, kwargs = ROUTES["create_sampling_session"].build(w, w.objects["session"])
    sampler_id = call(server, keys["owner"], method, path, **kwargs).json()[
        "sampling_session_id"]
    w.objects["sampler"] = sampler_id
    future = call(server, keys["owner"], *_sample(sampler_id)[:2],
                  **_sample(sampler_id)[2]).json()["request_id"]
    # Done, and not yet retrieved, when the matrix reads it: a delivered result is purged,
    # and asking for it again is a 410 (tests/security/test_payload_retention.py).
    _wait_until_finished(server, future)
    w.objects["future"] = future
    w.objects["release"], w.objects["link"] = _released_export(server, keys["owner"], trainer)
    yield w
    sc.close("success").result()


def _wait_until_finished(server, request_id: str) -> None:
    from audit.models import Future

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with transaction(server.state.read_factory) as session:
            if session.get(Future, request_id).status in ("done", "failed"):
                return
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not finish")


def _released_export(server, owner: str, trainer) -> tuple[str, str]:
    """An exported adapter the gate released (an untrained LoRA equals its base), its
    release id and a signed link to one of its files."""
    path = trainer.save_weights_external("matrix-export").result().path
    run, _, checkpoint = path.removeprefix("tinker://").partition("/")
    urls = call(server, owner, "GET", f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}"
                "/external_weights_urls").json()["urls"]
    token = urls["adapter_config.json"].rsplit("/", 1)[1]
    from sqlalchemy import select

    from audit.models import ReleaseRequest

    with transaction(server.state.factory) as session:
        release = session.scalars(select(ReleaseRequest.id).where(
            ReleaseRequest.tinker_path == path)).one()
    return release, token


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_route_decides_every_caller_and_object_as_reviewed(world, route):
    spec = ROUTES[route]
    targets = ["none"] if spec.kind == "none" else ["existing", "missing"]
    mismatches = []
    for caller, target in itertools.product(CALLERS, targets):
        if target == "existing":
            obj = world.fresh(spec.kind) if spec.fresh or spec.kind in GLOBAL_KINDS \
                else world.objects[spec.kind]
        else:
            obj = MISSING.get(spec.kind)
        method, path, kwargs = spec.build(world, obj)
        start = time.monotonic()
        resp = call(world.server, world.keys[caller], method, path, **kwargs)
        elapsed = time.monotonic() - start
        want = expected(route, caller, target)
        got: str | int = OK if resp.is_success else resp.status_code
        if got != want:
            mismatches.append(f"{caller}/{target}: expected {want}, got {resp.status_code} "
                              f"{resp.text[:160]}")
        elif got != OK:
            body = resp.json()
            assert body["detail"] and body["code"] and body["request_id"], body
            # Refused at once, not after a long-poll wait (the bound is loose because a
            # busy 2-core CI machine once took 1.5 s to answer an immediate refusal).
            patience = world.server.state.settings.long_poll_seconds * 0.8
            assert elapsed < patience, f"{caller}/{target} refusal took {elapsed:.2f} s"
    assert not mismatches, "\n".join(mismatches)


def test_the_matrix_covers_every_route():
    from gateway.app import api_routes, create_app

    assert set(ROUTES) == {r.name for r in api_routes(create_app())}
