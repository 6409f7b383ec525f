"""glibc keeps freed memory for reuse in a metakit process (``engine.malloc``): a large tensor freed
and allocated again is not faulted in again, page by page; ``METAKIT_MALLOC=system`` leaves glibc's way."""
import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from metakit.engine.malloc import keep_freed_memory
applied = keep_freed_memory()
faults = []
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(12_000_000).fill_(1.0)  # 48 MB: above glibc's largest automatic mmap threshold (32 MB)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), sum(faults[4:]))  # steady state: the last 4
"""


def probe(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "1", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    applied, kept = probe(METAKIT_MALLOC="")
    skipped, system = probe(METAKIT_MALLOC="system")
    assert applied and not skipped
    pages = 48_000_000 // 4096
    assert system > 3 * pages  # glibc's default: each of the last 4 allocations is faulted in again
    assert kept < pages // 10  # kept: the freed block is reused
