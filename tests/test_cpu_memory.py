"""glibc keeps freed blocks in the process once keep_freed_memory() ran, and maps every block of a few MB
once map_gathered_weights() ran (ZeRO-3; checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from peftrun.cpu.memory import keep_freed_memory, map_gathered_weights

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
setting = {"on": keep_freed_memory, "gathered": map_gathered_weights}.get(sys.argv[1])
changed = setting() if setting else False
before = libc.mallinfo2().hblkhd  # bytes in blocks that are mappings of their own
block = libc.malloc(16 << 20)  # an activation-sized block
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
kept = libc.mallinfo2().keepcost
before = libc.mallinfo2().hblkhd
again = libc.malloc(4 << 20)  # a gathered weight's size, after one of its size was freed
remapped = libc.mallinfo2().hblkhd - before
libc.free(again)
print(json.dumps({"changed": changed, "mapped": mapped, "kept": kept, "remapped": remapped}))
"""


def _probe(mode: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    result: dict[str, int] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_come_from_the_heap_and_stay_after_free() -> None:
    default, kept = _probe("off"), _probe("on")
    # glibc's default: a fresh 16 MiB block is its own mapping, unmapped again when freed.
    assert default["mapped"] >= 16 << 20 and default["kept"] < 16 << 20
    assert kept["changed"]
    assert kept["mapped"] == 0 and kept["kept"] >= 16 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_under_zero3_blocks_of_a_few_mb_stay_mappings_of_their_own() -> None:
    """glibc's default raises its mmap threshold once a large block is freed, so the next gathered
    weight comes from the heap (and its space stays resident after it is freed)."""
    default, gathered = _probe("off"), _probe("gathered")
    assert default["remapped"] == 0
    assert gathered["changed"]
    assert gathered["remapped"] >= 4 << 20 and gathered["kept"] < 16 << 20
