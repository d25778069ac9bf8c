"""Child processes whose address space is capped (RLIMIT_AS), for the tests that score a store larger than the
memory a process may use (tests/test_out_of_core.py, tests/test_streaming.py).

A child script is ``PRELUDE`` + its own body: the prelude imports torch (one thread) and defines
``vm_bytes(key)`` (a /proc/self/status entry in bytes) and ``cap_address_space(cap_mb)``, which caps the
address space at what the process maps at that moment plus ``cap_mb`` and returns that baseline, so the cap
measures the scoring, not torch's import. The body prints one JSON line last; :func:`run_capped` returns it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)

    def vm_bytes(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def cap_address_space(cap_mb):
        base = vm_bytes("VmSize")
        cap = base + int(cap_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        return base
    """
)


def run_capped(script: str, *args: str, timeout: float) -> dict:
    """Run ``script`` (PRELUDE + body) in a fresh interpreter with ``args``; its last stdout line as JSON."""
    # a fixed mmap threshold: glibc otherwise raises it to the size of the last large block freed, so chunk-sized
    # temporaries land in the brk heap and its fragmentation (which depends on the import-time heap layout and
    # the hash seed, not on what a method holds) decides whether a later allocation fits under the cap
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
