"""train/heap.py: after keep_freed_memory, the large tensors of a repeating step reuse the pages
that the previous step freed, where glibc's defaults map and fault them anew every step. Counted
in minor page faults (getrusage), not timed; each case runs in its own process, since the setting
is process-wide."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRAIN_DIR

PROBE = """
import resource, sys
sys.path.insert(0, {train!r})
import torch
import heap
torch.set_num_threads(1)
if {keep}:
    assert heap.keep_freed_memory() is True
    assert heap.keep_freed_memory() is True  # once per process; a second call only reports
MIB = 1 << 18  # floats
for step in range(12):  # a training step's pattern: tensors above glibc's 32 MiB mmap ceiling
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(64 * MIB)
    b = torch.ones(40 * MIB)
    c = a * 2
    del a
    d = torch.ones(100 * MIB)
    del b, c, d
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

TOUCHED_PAGES = (268 << 20) // 4096  # a step writes 268 MiB


def huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def faults_per_step(keep: bool) -> list:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(train=str(TRAIN_DIR), keep=keep)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [int(line) for line in proc.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_freed_large_tensors_are_reused_without_page_faults() -> None:
    # glibc's defaults: every step's large tensors are fresh mappings, faulted in page by page
    # (in 2 MiB pages, 512x fewer faults, where transparent huge pages are "always").
    default = faults_per_step(keep=False)
    pages = TOUCHED_PAGES // 512 if huge_pages_always() else TOUCHED_PAGES
    assert len(default) == 12 and min(default[-4:]) > pages // 2, default
    # Kept: after a few steps the heap holds enough freed pages for a whole step.
    kept = faults_per_step(keep=True)
    assert len(kept) == 12 and sum(kept[-4:]) < TOUCHED_PAGES // 50, kept
