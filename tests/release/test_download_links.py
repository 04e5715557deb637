"""The link-signing secret behind the external-weights URLs: private to the server's
user, stable across restarts, and one secret when several API processes start at once."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor

from gateway import downloads


def test_the_secret_is_created_once_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "url-signing.key"
    first = downloads.signing_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert downloads.signing_secret(path) == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["url-signing.key"]


def test_processes_starting_together_agree_on_one_secret(tmp_path):
    path = tmp_path / "url-signing.key"
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: downloads.signing_secret(path), range(32)))
    assert secrets == {bytes.fromhex(path.read_text().strip())}
    link = downloads.Link(1, "principal", "adapter_config.json", 2**40)
    assert downloads.verify(secrets.pop(), downloads.sign(downloads.signing_secret(path),
                                                          link)) == link


def test_a_link_is_bound_by_its_mac_to_checkpoint_principal_key_file_and_expiry():
    import base64
    import json

    import pytest

    secret = bytes(32)
    link = downloads.Link(7, "alice", "adapter_model.safetensors", 2**40, "key-1")
    token = downloads.sign(secret, link)
    assert downloads.verify(secret, token) == link
    body, mac = token.split(".")
    for changed in ([2, 8, "alice", "key-1", "adapter_model.safetensors", 2**40],
                    [2, 7, "bob", "key-1", "adapter_model.safetensors", 2**40],
                    [2, 7, "alice", "key-2", "adapter_model.safetensors", 2**40],
                    [2, 7, "alice", "key-1", "adapter_config.json", 2**40],
                    [2, 7, "alice", "key-1", "adapter_model.safetensors", 2**41]):
        forged = base64.urlsafe_b64encode(json.dumps(changed, separators=(",", ":")).encode())
        with pytest.raises(downloads.LinkError, match="signature"):
            downloads.verify(secret, forged.decode().rstrip("=") + "." + mac)
    with pytest.raises(downloads.LinkError, match="signature"):
        downloads.verify(bytes([1]) + secret[1:], token)  # another server's secret
    with pytest.raises(downloads.LinkError, match="signature"):
        downloads.verify(secret, body + "." + mac[:-1] + ("0" if mac[-1] != "0" else "1"))
    with pytest.raises(downloads.LinkError, match=r"malformed|signature"):
        downloads.verify(secret, "not a link")


def test_a_link_expires_and_may_not_outlive_the_lifetime_in_force():
    import datetime as dt

    import pytest

    secret = bytes(32)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    soon = downloads.sign(secret, downloads.Link(1, "p", "adapter_config.json",
                                                 int(now.timestamp()) + 600, "k"))
    assert downloads.verify(secret, soon, now=now, max_lifetime=900).filename
    with pytest.raises(downloads.LinkError, match="expired"):
        downloads.verify(secret, soon, now=now + dt.timedelta(seconds=601))
    late = downloads.sign(secret, downloads.Link(1, "p", "adapter_config.json",
                                                 int(now.timestamp()) + 86400, "k"))
    with pytest.raises(downloads.LinkError, match="outlives"):
        downloads.verify(secret, late, now=now, max_lifetime=900)


def test_recipients_are_age_or_ssh_public_keys_and_a_bad_one_is_named():
    import pyrage
    import pytest

    identity = pyrage.x25519.Identity.generate()
    ssh_key = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO+sN7OtvSWOsJC8s8S9sIuwa4fy3HqXvYBUob+bONpS"
               " someone@example")
    assert len(downloads.parse_recipients([str(identity.to_public()), ssh_key])) == 2
    for bad in ("age1notakey", "AGE-SECRET-KEY-1XYZ", "ssh-ed25519 AAAA", "", "x" * 5000):
        with pytest.raises(downloads.RecipientError) as refused:
            downloads.parse_recipients([str(identity.to_public()), bad])
        assert repr(bad[:80])[:-1] in str(refused.value)
    with pytest.raises(downloads.RecipientError, match="empty"):
        downloads.parse_recipients([])
    sealed = downloads.encrypt(b"adapter bytes", [str(identity.to_public())])
    assert b"adapter bytes" not in sealed
    assert pyrage.decrypt(sealed, [identity]) == b"adapter bytes"
    assert sealed != downloads.encrypt(b"adapter bytes", [str(identity.to_public())])


def test_an_encrypted_export_serves_only_age_files():
    import pytest

    assert downloads.served_files(None) == downloads.FILES
    assert downloads.served_files(["age1x"]) == ("adapter_config.json.age",
                                                 "adapter_model.safetensors.age")
    assert downloads.plaintext_name("adapter_model.safetensors.age", ["age1x"]) == \
        "adapter_model.safetensors"
    for name in ("adapter_model.safetensors", "manifest.json", "../adapter.safetensors"):
        with pytest.raises(downloads.LinkError):
            downloads.plaintext_name(name, ["age1x"])
    with pytest.raises(downloads.LinkError):
        downloads.plaintext_name("adapter_model.safetensors.age", None)
