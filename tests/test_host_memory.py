"""keep_freed_host_memory: the memory a training step frees is reused by the next step instead of being faulted in
again (in a child process, since the setting is process-wide).

The measure is a whole forward/backward step of a small MLP, not one big tensor freed and allocated again: torch
asks for 64-byte aligned blocks, and a freed block whose neighbour is still live can be a few bytes too small for
the aligned request, so a single repeated allocation is reused only some of the time (it made the earlier version
of this test flaky: 16,384 faults instead of 0 in 6 runs of 8). A step's mix of sizes reuses most of what it frees.
"""

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, torch
from drlora import keep_freed_host_memory

torch.set_num_threads(1)  # a thread holding the main heap's lock would send malloc to a 64 MiB thread heap
torch.manual_seed(0)
layers = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 16))
inputs = torch.randn(4096, 16)  # the hidden activations are 64 MiB: above glibc's largest default mmap threshold

def faults_per_step(steps=6):
    faults = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        layers(inputs).square().mean().backward()
        layers.zero_grad(set_to_none=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults[1:]  # the first step faults its memory in either way

system = faults_per_step()
message = keep_freed_host_memory()
print(json.dumps({"system": system, "kept": faults_per_step(), "message": message,
                  "again": keep_freed_host_memory()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_training_step_reuses_the_memory_the_last_step_freed():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    activation_pages = (4096 * 4096 * 4) // 4096
    # glibc's default: each step's activations are fresh mappings, faulted in page by page (measured ~65,600 a step)
    assert min(result["system"]) > activation_pages
    # kept: measured 16,400-16,600 faults over 5 steps against ~328,000 by default (8 runs, 2026-12-03)
    assert sum(result["kept"]) < sum(result["system"]) / 5, result
    assert "stay in the process" in result["message"] and result["again"] == result["message"]
