"""keep_freed_host_memory: a tensor freed and allocated again stops costing page faults (in a child process, since
the setting is process-wide)."""

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, torch
from drlora import keep_freed_host_memory

torch.set_num_threads(1)  # a thread holding the main heap's lock would send malloc to a 64 MiB thread heap

def faults_of_reallocation(nbytes=64 << 20):
    faults = []
    for _ in range(4):  # after the first round, a round reuses what the last one freed, or faults it in again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensor = torch.empty(nbytes // 4)
        tensor.fill_(1.0)
        del tensor
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[1:])

system = faults_of_reallocation()
message = keep_freed_host_memory()
print(json.dumps({"system": system, "kept": faults_of_reallocation(), "message": message,
                  "again": keep_freed_host_memory()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    pages = (64 << 20) // 4096
    assert result["system"] > pages // 2  # glibc's default: the 64 MiB block is unmapped on free, then faulted in
    assert result["kept"] < pages // 50
    assert "stay in the process" in result["message"] and result["again"] == result["message"]
