"""RFC 6962 Merkle trees: the RFC's known-answer roots, the Certificate Transparency
test vectors for audit paths and consistency proofs, and proofs that must fail."""

from __future__ import annotations

import hashlib

import pytest

from audit import merkle

LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                     "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def hexes(proof: list[bytes]) -> list[str]:
    return [p.hex() for p in proof]


@pytest.mark.parametrize("size", range(9))
def test_roots_match_the_rfc_known_answers(size):
    assert merkle.root(LEAVES[:size]).hex() == ROOTS[size]


def test_audit_paths_and_consistency_proofs_match_the_ct_vectors():
    assert hexes(merkle.inclusion_proof(LEAVES, 0)) == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]
    assert hexes(merkle.consistency_proof(LEAVES, 6)) == [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]
    assert hexes(merkle.consistency_proof(LEAVES[:5], 2)) == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]


def test_every_inclusion_and_consistency_proof_up_to_eight_leaves_verifies():
    for n in range(1, 9):
        root = merkle.root(LEAVES[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(LEAVES[:n], i)
            assert merkle.verify_inclusion(LEAVES[i], i, n, proof, root)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(LEAVES[:n], m)
            assert merkle.verify_consistency(m, n, merkle.root(LEAVES[:m]), root, proof)


def test_wrong_leaves_indexes_sizes_or_proofs_fail():
    root = merkle.root(LEAVES)
    proof = merkle.inclusion_proof(LEAVES, 3)
    assert not merkle.verify_inclusion(LEAVES[4], 3, 8, proof, root)
    assert not merkle.verify_inclusion(LEAVES[3], 2, 8, proof, root)
    assert not merkle.verify_inclusion(LEAVES[3], 3, 3, proof, root)  # index beyond size
    assert not merkle.verify_inclusion(LEAVES[3], 3, 16, proof, root)
    assert not merkle.verify_inclusion(LEAVES[3], 3, 8, proof[:-1], root)
    bad = [proof[0], hashlib.sha256(b"x").digest(), *proof[2:]]
    assert not merkle.verify_inclusion(LEAVES[3], 3, 8, bad, root)
    cons = merkle.consistency_proof(LEAVES, 5)
    old = merkle.root(LEAVES[:5])
    forked = merkle.root([*LEAVES[:4], b"forked"])
    assert not merkle.verify_consistency(5, 8, forked, root, cons)
    assert not merkle.verify_consistency(5, 8, old, ROOTS_BYTES[7], cons)
    assert not merkle.verify_consistency(5, 8, old, root, cons[:-1])
    assert not merkle.verify_consistency(8, 5, root, old, cons)


ROOTS_BYTES = [bytes.fromhex(r) for r in ROOTS]


def test_the_streaming_root_equals_the_recursive_definition_for_many_sizes():
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(70)]
    for n in range(71):
        hashed = [merkle.leaf_hash(d) for d in leaves[:n]]
        assert merkle.root(leaves[:n]) == merkle._subtree_root(hashed)
