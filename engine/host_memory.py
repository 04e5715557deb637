"""How this process's host (CPU) memory allocator treats freed tensor memory.

A training step allocates and frees gigabytes of tensors (a B16xT256 SmolLM2 step: logits,
their log-softmax and both gradients are ~800 MB each). glibc's malloc serves every block
over 32 MB with a fresh `mmap` and returns it to the kernel on `free`, so the next step
touches brand-new pages again: about a million page faults per step. In a virtual machine
a fault is expensive (measured on this project's 2-core Firecracker VMs: 21.5-23.9 s per
such step, 10-16 s of it in the kernel, against 15.1 s with 0.8 s in the kernel once freed
memory is kept; `benchmarks/host_memory_bench.py`).

`retain_freed_memory()` tells glibc to serve large blocks from its heap and never give
freed heap back (`M_MMAP_MAX = 0`, `M_TRIM_THRESHOLD = -1`), so a process's memory stays
at its peak and is reused from step to step. Called once per process by whatever runs
models in it (`TorchBackend`, the composition root's screener); idempotent; a no-op where
the C library is not glibc. The cost: a process's resident memory does not shrink after
its peak.

Must not import torch or know about models, HTTP or the database.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4

_lock = threading.Lock()
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keep freed memory in this process for reuse; True when glibc accepted it (then and
    on every later call), False where the C library is not glibc or refused it."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _mallopt(M_MMAP_MAX, 0) and _mallopt(M_TRIM_THRESHOLD, -1)
        return _applied


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(param, value) == 1
