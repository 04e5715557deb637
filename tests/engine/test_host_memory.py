"""engine.host_memory: a process that runs models keeps freed memory and reuses it, instead of
faulting in fresh pages for every large tensor (each fresh page costs a page fault: in a
virtual machine that cost a third of a training step's time)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from engine import host_memory

# A step of tensor work, as a training step does it: temporaries of 64 MB made, touched
# and freed. Reports the page faults of four steps after eight: with freed memory kept, steps
# in steady state reuse the earlier steps' pages.
PROBE = """
import json, resource, sys
import torch
if sys.argv[1] == "retain":
    from engine.host_memory import retain_freed_memory
    assert retain_freed_memory()
def step():
    x = torch.ones(64 * 2**20, dtype=torch.uint8)
    y = x * 2
    z = y + x
    del x, y, z
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the allocator setting is glibc's")


def _second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, cwd=Path(host_memory.__file__).parents[1])
    return int(json.loads(out.stdout))


@glibc_only
def test_freed_memory_is_reused_without_fresh_page_faults():
    default, retained = _second_round_faults("default"), _second_round_faults("retain")
    assert default >= 384  # 4 steps of 3 x 64 MB of fresh pages (at most 2 MB each)
    assert retained < default / 10


@glibc_only
def test_it_is_idempotent():
    assert host_memory.retain_freed_memory() is True
    assert host_memory.retain_freed_memory() is True


def test_the_backend_turns_it_on(backend):
    assert host_memory._applied is (platform.libc_ver()[0] == "glibc")
