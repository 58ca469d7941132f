"""pipeline.runtime.allocator: tensors up to 32 MiB come from malloc's heap, not from fresh mmaps.

Each case runs in a child interpreter: mallopt settings are process-wide and permanent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Reports, after keep_freed_memory(): whether it took, and how many MiB of a fresh 16 MiB
# tensor went to an mmap of its own (glibc's default for anything over 128 KiB until a
# block of that size has been freed once).
PROBE = """
import ctypes, json, torch
from pipeline.runtime.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory()
before = libc.mallinfo2()
x = torch.ones(4 * 2**20)  # 16 MiB
after = libc.mallinfo2()
print(json.dumps({"took": took, "mmapped_mib": (after.hblkhd - before.hblkhd) / 2**20}))
"""


def _probe(**env) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout)


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and mallinfo2 are glibc's")


@glibc_only
def test_large_tensors_come_from_the_heap():
    got = _probe(MIXMERGE_MALLOC="")
    assert got["took"] is True
    assert got["mmapped_mib"] == 0


@glibc_only
def test_system_setting_leaves_glibc_defaults():
    got = _probe(MIXMERGE_MALLOC="system")
    assert got["took"] is False
    assert got["mmapped_mib"] >= 16
