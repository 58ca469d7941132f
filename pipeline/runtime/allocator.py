"""Keep freed CPU memory in the process instead of handing it back to the kernel.

Why: glibc's malloc serves a request above its mmap threshold (128 KiB until a block that
large has been freed once) with a fresh mmap, and trims the heap's free top back to the
kernel. PyTorch's CPU allocator sits on malloc, so a training step that allocates and frees
the same activation-sized temporaries over and over pays a page fault per 4 KiB page each
time. Raising the threshold to glibc's maximum (32 MiB) and switching trimming off removes
that: on the 2-core CPU machine, K=8 stacked training in `python -m bench --only experts` took
0.170-0.177 s against 0.203-0.242 s with glibc's defaults (3 alternating runs each), at the
same peak memory.

Left as it is: blocks over 32 MiB are still mmapped. Switching mmap off altogether made a
75 MB tensor clone 6x faster (3.4 vs 20.8 ms), but glibc does not reuse a freed block for
an aligned request of the same size, so a K=8 ResNet-18 merge loop doubled its peak memory
(1,078 vs 532 MiB). PyTorch's tuning guide answers all of this with jemalloc or tcmalloc via
LD_PRELOAD; those are not on every machine and must be set before the process starts.

Set MIXMERGE_MALLOC=system to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import os

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve blocks up to 32 MiB from its heap and never to trim it.
    Returns whether the settings took (False off glibc, or with MIXMERGE_MALLOC=system)."""
    if os.environ.get("MIXMERGE_MALLOC", "").lower() == "system":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter already runs on
    except (OSError, AttributeError):  # no mallopt: not glibc (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. -1 as the trim threshold disables trimming altogether.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
