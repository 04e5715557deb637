"""RFC 6962 Merkle trees over audit entry hashes: roots, inclusion proofs and
consistency proofs, and their verification.

Leaves are the raw 32 bytes of each entry's `entry_hash`, in `seq` order (leaf index =
seq − 1). Hashes follow RFC 6962 §2.1: leaf = SHA-256(0x00 ‖ data), node =
SHA-256(0x01 ‖ left ‖ right), the split at the largest power of two below n, and the empty
tree is SHA-256(""). Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2.

Pure functions over bytes; must not touch the database (callers stream the leaves).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class RootBuilder:
    """The root of a growing tree in O(log n) memory: a stack of perfect subtrees, the
    way a streaming verifier reads the log once."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (size, hash), sizes decreasing
        self.size = 0

    def add(self, data: bytes) -> None:
        size, h = 1, leaf_hash(data)
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            size, h = left_size + size, node_hash(left, h)
        self._stack.append((size, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


def root(leaves: Iterable[bytes]) -> bytes:
    builder = RootBuilder()
    for data in leaves:
        builder.add(data)
    return builder.root()


def _subtree_root(hashes: Sequence[bytes]) -> bytes:
    """Root over already-leaf-hashed entries."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(_subtree_root(hashes[:k]), _subtree_root(hashes[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf `index` in the tree of `leaves` (RFC 6962 §2.1.1)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)}")
    return _path(index, [leaf_hash(d) for d in leaves])


def _path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    n = len(hashes)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, hashes[:k]), _subtree_root(hashes[k:])]
    return [*_path(m - k, hashes[k:]), _subtree_root(hashes[:k])]


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the tree of the first `old_size` leaves is a prefix of the tree of all
    of them (RFC 6962 §2.1.2)."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"old size {old_size} is not in 1..{len(leaves)}")
    return _subproof(old_size, [leaf_hash(d) for d in leaves], True)


def _subproof(m: int, hashes: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if whole else [_subtree_root(hashes)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, hashes[:k], whole), _subtree_root(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], False), _subtree_root(hashes[:k])]


def verify_inclusion(data: bytes, index: int, size: int, proof: Sequence[bytes],
                     expected_root: bytes) -> bool:
    """Does `data` sit at `index` in the tree of `size` leaves with root `expected_root`?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf_hash(data)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """Is the tree (old_size, old_root) a prefix of the tree (new_size, new_root)?"""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the path
        path = [old_root, *path]
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0
