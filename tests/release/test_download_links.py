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
