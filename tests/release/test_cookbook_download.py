"""tinker-cookbook's `weights.download()` against the gateway, unchanged, on the tiny model,
on SQLite and PostgreSQL: plain and age-encrypted exports, a training checkpoint (which the
cookbook exports encrypted to a key of its own), and the signed links as capabilities —
keyless, short-lived, bound to one checkpoint, file, principal and key, re-checked against
the release state when the bytes are read, and audited to the link's principal."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import httpx
import pyrage
import pytest
from sqlalchemy import select, update
from tinker import types
from tinker_cookbook import weights

from audit import log as audit_log
from audit.db import transaction
from audit.models import ApiKey, AuditEntry, Checkpoint
from gateway import downloads
from policy import authz
from policy.keys import authenticate, revoke_key
from tests.api.helpers import TEXTS, TINY, rest, service, sft_datum
from tests.conftest import _dialects
from tests.security.conftest import gate_server

EVENT = "api.download_external_weights"


@pytest.fixture(scope="module", params=_dialects())
def server(request, models_dir, tmp_path_factory):
    with gate_server(request, models_dir, tmp_path_factory, "cookbook") as live:
        yield live


@pytest.fixture(scope="module")
def key(server):
    return server.create_key(owner=f"cookbook-{server.database_url[:6]}")


@pytest.fixture(scope="module")
def trainer(server, key):
    tc = service(server, key).create_lora_training_client(base_model=TINY, rank=4,
                                                          seed=3).result()
    for _ in range(2):
        tc.forward_backward([sft_datum(tc.get_tokenizer(), t) for t in TEXTS], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return tc


@pytest.fixture(scope="module")
def plain_export(trainer):
    return trainer.save_weights_external("plain").result().path


@pytest.fixture(scope="module")
def identity():
    return pyrage.x25519.Identity.generate()


@pytest.fixture(scope="module")
def sealed_export(trainer, identity):
    other = pyrage.x25519.Identity.generate()  # a second recipient: either may decrypt
    return trainer.save_weights_external("sealed", age_encryption_recipients=[
        str(identity.to_public()), str(other.to_public())]).result().path


@pytest.fixture
def cookbook_env(monkeypatch, key):
    """What a cookbook user sets: the key in TINKER_API_KEY (the cookbook passes only
    base_url); its downloads are plain urllib GETs with no header."""
    monkeypatch.setenv("TINKER_API_KEY", key)


def _checkpoint(server, path: str) -> Checkpoint:
    with transaction(server.state.factory) as session:
        row = session.scalars(select(Checkpoint).where(Checkpoint.tinker_path == path)).one()
        session.expunge(row)
        return row


def _principal_and_key(server, key: str) -> tuple[str, str]:
    with transaction(server.state.factory) as session:
        principal, api_key = authenticate(session, key)
        return principal.id, api_key.id


def _stored_adapter(server, path: str) -> bytes:
    ckpt = _checkpoint(server, path)
    return (server.state.settings.checkpoint_root / ckpt.storage_dir
            / "adapter.safetensors").read_bytes()


def _urls(server, key: str, path: str) -> dict[str, str]:
    return rest(server, key).get_external_weights_urls(path).result().urls


def _link(server, ckpt_id: int, principal_id: str, filename: str, key_id: str,
          expires: int | None = None) -> str:
    """A link signed with the server's own secret (what only the server can make)."""
    token = downloads.sign(server.state.url_signing_secret, downloads.Link(
        ckpt_id, principal_id, filename, expires or int(time.time()) + 600, key_id))
    return f"{server.base_url}/api/v1/external_weights/{token}"


def _assert_peft_adapter(server, directory: Path, stored: bytes) -> None:
    """The files load with PEFT onto the base model, and the tensors are the gateway's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert (directory / "adapter_model.safetensors").read_bytes() == stored
    base = AutoModelForCausalLM.from_pretrained(server.state.registry.materialize(TINY),
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, directory).eval()
    loaded = load_file(directory / "adapter_model.safetensors")
    state = model.state_dict()
    matched = [k for k in state if "lora_" in k]
    assert matched and len(matched) == len(loaded)
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == "LORA"


def _audit_rows(server, since: int, event: str = EVENT) -> list[AuditEntry]:
    with transaction(server.state.factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.seq > since, AuditEntry.event_type == event)
            .order_by(AuditEntry.seq)).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


def _head(server) -> int:
    with transaction(server.state.factory) as session:
        return session.scalar(select(AuditEntry.seq).order_by(AuditEntry.seq.desc())
                              .limit(1)) or 0


# -- the cookbook, unchanged ----------------------------------------------------------

def test_the_cookbook_downloads_a_released_export_unchanged(server, cookbook_env, plain_export,
                                                            tmp_path):
    out = weights.download(tinker_path=plain_export, output_dir=str(tmp_path / "adapter"),
                           base_url=server.base_url)
    assert sorted(p.name for p in Path(out).iterdir()) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    _assert_peft_adapter(server, Path(out), _stored_adapter(server, plain_export))


def test_the_cookbook_downloads_an_age_encrypted_export_and_it_decrypts(
        server, cookbook_env, sealed_export, identity, tmp_path):
    assert json.loads(_checkpoint(server, sealed_export).age_recipients)[0] == \
        str(identity.to_public())
    out = Path(weights.download(tinker_path=sealed_export, output_dir=str(tmp_path / "sealed"),
                                base_url=server.base_url))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json.age",
                                                     "adapter_model.safetensors.age"]
    plain = tmp_path / "decrypted"
    plain.mkdir()
    for sealed in out.iterdir():
        assert sealed.read_bytes().startswith(b"age-encryption.org/v1\n")  # never plaintext
        pyrage.decrypt_file(str(sealed), str(plain / sealed.name.removesuffix(".age")),
                            [identity])
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt((out / "adapter_config.json.age").read_bytes(),
                       [pyrage.x25519.Identity.generate()])
    _assert_peft_adapter(server, plain, _stored_adapter(server, sealed_export))


def test_the_cookbook_downloads_a_training_checkpoint_through_an_encrypted_export(
        server, cookbook_env, key, trainer, tmp_path):
    """The cookbook loads the checkpoint into a new run, exports it encrypted to a key it
    generates, downloads and decrypts the files, renews and finally deletes the export."""
    state = trainer.save_state("for-cookbook").result().path
    out = Path(weights.download(tinker_path=state, output_dir=str(tmp_path / "state"),
                                base_url=server.base_url))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    with transaction(server.state.factory) as session:
        exports = session.scalars(select(Checkpoint).where(
            Checkpoint.kind == "external_weights", Checkpoint.name == "download")).all()
        assert exports == []  # the cookbook deleted its temporary export
        saved = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "api.save_weights_external")
            .order_by(AuditEntry.seq.desc())).first()
        assert json.loads(saved.payload)["age_recipients"] == 1
    _assert_peft_adapter(server, out, _stored_adapter(server, state))


def test_a_bad_recipient_is_refused_at_export_naming_it(server, key, trainer):
    good = str(pyrage.x25519.Identity.generate().to_public())
    for bad in ("age1notarealrecipient", "AGE-SECRET-KEY-1QQQ"):
        resp = httpx.post(f"{server.base_url}/api/v1/save_weights_external",
                          headers={"X-API-Key": key}, timeout=30,
                          json={"model_id": trainer.model_id, "path": "bad-recipient",
                                "age_encryption_recipients": [good, bad],
                                "type": "save_weights_external"})
        assert resp.status_code == 400, resp.text
        assert bad in resp.json()["detail"]
    with transaction(server.state.factory) as session:
        assert session.scalars(select(Checkpoint).where(
            Checkpoint.name == "bad-recipient")).first() is None


# -- links as capabilities ------------------------------------------------------------

def test_a_link_works_without_a_key_and_with_the_owners_key_and_is_audited_to_its_principal(
        server, key, plain_export):
    principal_id, key_id = _principal_and_key(server, key)
    urls = _urls(server, key, plain_export)
    before = _head(server)
    keyless = httpx.get(urls["adapter_model.safetensors"], timeout=30)
    assert keyless.status_code == 200 and keyless.content == _stored_adapter(server,
                                                                             plain_export)
    assert keyless.headers["cache-control"] == "no-store"
    keyed = httpx.get(urls["adapter_config.json"], headers={"X-API-Key": key}, timeout=30)
    assert keyed.status_code == 200 and keyed.json()["peft_type"] == "LORA"
    rows = _audit_rows(server, before)
    assert [(r.actor, r.decision) for r in rows] == [(principal_id, "allow")] * 2
    first, second = (json.loads(r.payload) for r in rows)
    assert first["credential"] == "signed_link" and first["api_key_id"] == key_id
    assert first["file"] == "adapter_model.safetensors" and rows[0].subject == plain_export
    assert first["plaintext_sha256"] == _checkpoint(server, plain_export).adapter_sha256
    assert "credential" not in second and second["api_key_id"] == key_id
    token = urls["adapter_model.safetensors"].split("/")[-1]
    assert key not in rows[0].payload and token not in rows[0].payload + rows[0].subject
    assert first["link_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    # Another principal's key does not make someone else's link theirs.
    other = server.create_key()
    assert httpx.get(urls["adapter_config.json"], headers={"X-API-Key": other},
                     timeout=30).status_code == 404
    with transaction(server.state.factory) as session:
        assert audit_log.verify(session).ok


def test_a_tampered_expired_or_overlong_link_is_refused_and_audited_as_anonymous(
        server, key, plain_export):
    principal_id, key_id = _principal_and_key(server, key)
    ckpt = _checkpoint(server, plain_export)
    url = _urls(server, key, plain_export)["adapter_config.json"]
    prefix, token = url.rsplit("/", 1)
    body, mac = token.split(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[4] = "adapter_model.safetensors"  # another file under the same MAC
    swapped = base64.urlsafe_b64encode(json.dumps(raw, separators=(",", ":")).encode())
    before = _head(server)
    for bad, why in ((f"{prefix}/{body}.{flipped}", "signature"),
                     (f"{prefix}/{swapped.decode().rstrip('=')}.{mac}", "signature"),
                     (_link(server, ckpt.id, principal_id, "adapter_config.json", key_id,
                            expires=int(time.time()) - 1), "expired"),
                     (_link(server, ckpt.id, principal_id, "adapter_config.json", key_id,
                            expires=int(time.time()) + 7 * 86400), "outlives"),
                     (_link(server, ckpt.id, principal_id, "adapter_config.json", ""),
                      "names no API key")):
        refused = httpx.get(bad, timeout=30)
        assert refused.status_code == 403 and why in refused.json()["detail"], refused.text
    rows = _audit_rows(server, before)
    assert [(r.actor, r.decision) for r in rows] == [("anonymous", "deny")] * 5
    # A link is a bearer credential: audit rows keep only its digest.
    assert body not in rows[0].subject and rows[0].subject.startswith(
        "/api/v1/external_weights/sha256:")


def test_a_link_serves_only_its_own_checkpoint_file_and_principal(
        server, key, trainer, plain_export, sealed_export):
    principal_id, key_id = _principal_and_key(server, key)
    plain = _checkpoint(server, plain_export)
    sealed = _checkpoint(server, sealed_export)
    state = _checkpoint(server, trainer.save_state("not-exported").result().path)
    other_key = server.create_key()
    other_principal, other_key_id = _principal_and_key(server, other_key)
    for url, status in (
            # files that are not the export's, even when signed by the server
            (_link(server, plain.id, principal_id, "adapter.safetensors", key_id), 404),
            (_link(server, plain.id, principal_id, "../manifest.json", key_id), 404),
            (_link(server, plain.id, principal_id, "adapter_config.json.age", key_id), 404),
            # the plaintext of an encrypted export
            (_link(server, sealed.id, principal_id, "adapter_model.safetensors", key_id), 404),
            # a checkpoint that is not external weights
            (_link(server, state.id, principal_id, "adapter_config.json", key_id), 404),
            # a link naming another principal (and its key) for this checkpoint
            (_link(server, plain.id, other_principal, "adapter_config.json", other_key_id),
             404),
            # a key that is not the named principal's
            (_link(server, plain.id, principal_id, "adapter_config.json", other_key_id), 403),
            # a checkpoint that never existed
            (_link(server, 10**9, principal_id, "adapter_config.json", key_id), 404)):
        resp = httpx.get(url, timeout=30)
        assert resp.status_code == status, (url, resp.text)
    sealed_url = _urls(server, key, sealed_export)["adapter_model.safetensors.age"]
    assert set(_urls(server, key, sealed_export)) == {"adapter_config.json.age",
                                                      "adapter_model.safetensors.age"}
    assert httpx.get(sealed_url, timeout=30).content.startswith(b"age-encryption.org/v1\n")


def test_a_link_stops_when_its_checkpoint_is_quarantined_expired_or_deleted(
        server, key, trainer):
    path = trainer.save_weights_external("short-lived").result().path
    urls = _urls(server, key, path)
    url = urls["adapter_config.json"]
    assert httpx.get(url, timeout=30).status_code == 200
    principal_id, _ = _principal_and_key(server, key)

    def set_checkpoint(**values) -> None:
        with transaction(server.state.factory) as session:
            session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                            .values(**values))

    before = _head(server)
    set_checkpoint(release_state="quarantined")  # e.g. by a later decision
    refused = httpx.get(url, timeout=30)
    assert refused.status_code == 403 and refused.json()["code"] == "release_refused"
    set_checkpoint(release_state="released")
    assert httpx.get(url, timeout=30).status_code == 200
    set_checkpoint(expires_at=_past())
    assert httpx.get(url, timeout=30).status_code == 404
    set_checkpoint(expires_at=None)
    rest(server, key).delete_checkpoint_from_tinker_path(path).result()
    gone = httpx.get(urls["adapter_model.safetensors"], timeout=30)
    assert gone.status_code == 404
    rows = _audit_rows(server, before)
    assert [(r.actor, r.decision) for r in rows] == [
        (principal_id, "deny"), (principal_id, "allow"), (principal_id, "deny"),
        (principal_id, "deny")]
    assert all(url.rsplit("/", 1)[1] not in r.subject for r in rows)


def test_a_link_stops_when_its_key_is_revoked_or_policy_denies_its_principal(
        server, trainer, plain_export):
    """A link is a delegation of the key that asked for it: the key's revocation and
    casbin's decision for its principal still apply to it."""
    key = server.create_key()
    tc = service(server, key).create_lora_training_client(base_model=TINY, rank=4).result()
    path = tc.save_weights_external("delegated").result().path
    url = _urls(server, key, path)["adapter_config.json"]
    principal_id, key_id = _principal_and_key(server, key)
    assert httpx.get(url, timeout=30).status_code == 200
    with transaction(server.state.factory) as session:
        rule = authz.add_rule(session, actor="test", subject=f"principal:{principal_id}",
                              resource="weights", action="export", effect="deny")
        rule_id = rule.id
    denied = httpx.get(url, timeout=30)
    assert denied.status_code == 403, denied.text
    with transaction(server.state.factory) as session:
        authz.remove_rule(session, actor="test", rule_id=rule_id)
    assert httpx.get(url, timeout=30).status_code == 200
    with transaction(server.state.factory) as session:
        revoke_key(session, key_id=key_id, actor="test", reason="leaked")
        assert session.get(ApiKey, key_id).status == "revoked"
    revoked = httpx.get(url, timeout=30)
    assert revoked.status_code == 403 and "revoked" in revoked.json()["detail"]


def _past():
    import datetime as dt

    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
