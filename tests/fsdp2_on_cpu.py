"""`drlora train` under accelerate's FSDP2 plugin on a CPU machine — for tests only.

accelerate selects FSDP only on accelerators: launched with an FSDP config on a CPU machine, its AcceleratorState
stays MULTI_CPU and the FSDP code path is never reached. This script changes that one decision after accelerate has
made it (with ACCELERATE_USE_FSDP=true, as `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets, the
state becomes FSDP with the plugin built from the same environment), then runs `drlora train`. Everything after —
accelerate's fsdp2_prepare_model, the Trainer's FSDP checkpointing, gloo's collectives — is the real code.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tests/fsdp2_on_cpu.py train ...
"""

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None
    if wanted and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # AcceleratorState's copy; PartialState keeps gloo's barriers
        self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from drlora.cli import main

    sys.exit(main(sys.argv[1:]))
