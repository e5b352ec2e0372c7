"""Resident memory per process and step time of DR-LoRA training under DDP and under FSDP2, on CPU (gloo).

    python bench/sharding_memory.py [--layers 8] [--batch 2] [--seq 128] [--warmup 1] [--steps 3]
                                    [--variants ddp,fsdp2] [--out runs/bench/sharding_memory.json]

Why: in a DR-LoRA run almost all the memory is the frozen base — here an OLMoE-shaped model whose 64 experts per
layer hold 64 * 3 * 1024 * 512 ~ 100 M parameters (~400 MB in float32), against ~6 M trainable LoRA parameters per
layer. DDP keeps the whole base on every process; FSDP2 (`fully_shard` on every decoder layer, then on the
DRLoRAModel root) keeps 1/world of each parameter and all-gathers one layer at a time for its forward and its
backward. So FSDP2 should hold about half the base per process (2 processes) and pay for it in step time with the
all-gathers (frozen weights too: the backward needs them for the input gradients). This measures both sides of
that trade on the same model, batch and loop — the plain loop of a user's own script: forward, backward,
`update_and_allocate`, AdamW step (DR-LoRA grows during the run: growth_interval 2, events in the timed steps).

Each variant runs in its own `torch.multiprocessing.spawn` of 2 processes (gloo, FileStore, 1 torch thread each, as
2 processes share 2 cores). "start" is a process after init_process_group; every process then imports transformers
and builds the whole model (same seed), then wraps or shards it, so the "build" column holds the imports and the
whole model once in both variants; "wrapped" is what stays resident after DDP's wrap or
FSDP2's sharding (the replaced full tensors freed), and "train peak" the high-water mark during the steps. "step
adds" (train peak - wrapped) is what training adds on top: under DDP the gradients, DDP's buckets, AdamW's state and
the activations; under FSDP2 their shards plus the layers it all-gathers for the moment (the one computing and the
one prefetched, with their gather buffers) — a cost per process that does not shrink with the shard, so the saving
in the peak grows with the number of layers.

Memory is the process's resident set from /proc/self/status: VmRSS now, and VmHWM, its high-water mark, which
writing "5" to /proc/self/clear_refs resets to the current RSS (Linux >= 4.0), so one process measures the peak of
each phase separately (build, wrap, training) — unlike getrusage's ru_maxrss, which never resets. Step time is the
median over the timed steps of the slower process's step (the collectives keep the two in step); other jobs on the
machine move step times but not memory. Process 0 gathers both processes' numbers (all_gather_object) and writes
them; the table prints each process's and the FSDP2 / DDP ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
GIB = 1 << 30
OLMOE = {"hidden_size": 1024, "intermediate_size": 512, "num_experts": 64, "num_experts_per_tok": 8,
         "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1024, "max_position_embeddings": 512}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Phases:
    """Resident set (now) and its high-water mark (since the last `start`) per named phase, in bytes."""

    def __init__(self):
        self.values = {"start_rss": _status_kib("VmRSS") * 1024}

    @staticmethod
    def start() -> None:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:  # VmHWM := VmRSS
            clear.write("5")

    def end(self, name: str) -> None:
        gc.collect()
        self.values[f"{name}_peak"] = _status_kib("VmHWM") * 1024
        self.values[f"{name}_rss"] = _status_kib("VmRSS") * 1024


def build(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    from drlora import DRLoRAConfig, get_dr_lora_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("olmoe", num_hidden_layers=args.layers, eos_token_id=None, bos_token_id=None,
                                  pad_token_id=None, **OLMOE)
    base = AutoModelForCausalLM.from_config(config)
    # a notional 100-step run whose growth events (steps 1, 3, 5, ...) fall among the measured steps
    return get_dr_lora_model(base, DRLoRAConfig(r_init=8, r_target=16, r_max=32, total_steps=100,
                                                growth_interval=2, warmup_ratio=0.01, lora_dropout=0.0))


def wrap(variant: str, model):
    """(the module the forward goes through, the DRLoRAModel)."""
    if variant == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh), model


def held_parameter_bytes(model) -> int:
    """Parameter bytes this process holds: its local shard of a DTensor, the whole tensor otherwise."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


def _worker(rank: int, variant: str, store: str, out: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    try:
        phases = Phases()
        phases.start()
        begin = time.perf_counter()
        model = build(args)
        phases.end("build")
        build_s = time.perf_counter() - begin
        phases.start()
        begin = time.perf_counter()
        forward, model = wrap(variant, model)
        phases.end("wrapped")
        wrap_s = time.perf_counter() - begin
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times, hooks, events = [], [], []
        phases.start()
        for step in range(args.warmup + args.steps):
            x = torch.randint(0, OLMOE["vocab_size"], (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(1000 * rank + step))
            begin = time.perf_counter()
            forward(x, labels=x).loss.backward()
            hook = time.perf_counter()
            if (event := model.update_and_allocate(step)) is not None:
                events.append(event.step)
            hooks.append(time.perf_counter() - hook)
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - begin)
            if rank == 0:
                print(f"  {variant}: step {step} {times[-1]:.2f} s (update_and_allocate {hooks[-1]:.2f} s"
                      f"{', growth event' if events and events[-1] == step else ''})", flush=True)
        phases.end("train")
        phases.values["step_adds"] = phases.values["train_peak"] - phases.values["wrapped_rss"]
        mine = dict(phases.values, build_s=build_s, wrap_s=wrap_s, step_s=times, update_and_allocate_s=hooks,
                    events=events, parameter_bytes=held_parameter_bytes(model),
                    trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            with open(os.path.join(out, f"{variant}.json"), "w") as handle:
                json.dump(everyone, handle)
    finally:
        dist.destroy_process_group()


def run_variant(variant: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="sharding_memory_") as folder:
        start = time.perf_counter()
        mp.spawn(_worker, args=(variant, os.path.join(folder, "store"), folder, args), nprocs=WORLD, join=True)
        wall = time.perf_counter() - start
        with open(os.path.join(folder, f"{variant}.json")) as handle:
            processes = json.load(handle)
    slowest = [max(steps) for steps in zip(*(p["step_s"] for p in processes), strict=True)]  # the slower process
    return {"processes": processes, "step_s": statistics.median(slowest[args.warmup:]), "wall_s": wall}


COLUMNS = (("start", "start_rss"), ("build", "build_rss"), ("build peak", "build_peak"), ("wrapped", "wrapped_rss"),
           ("wrap peak", "wrapped_peak"), ("train peak", "train_peak"), ("step adds", "step_adds"),
           ("params held", "parameter_bytes"))


def print_table(results: dict) -> dict:
    print(f"{'variant':<8}{'proc':>5}" + "".join(f"{name + ' GiB':>16}" for name, _ in COLUMNS) + f"{'step s':>9}")
    for variant, result in results.items():
        for rank, p in enumerate(result["processes"]):
            print(f"{variant:<8}{rank:>5}" + "".join(f"{p[key] / GIB:>16.2f}" for _, key in COLUMNS)
                  + f"{result['step_s']:>9.2f}")
    ratios = {}
    if {"ddp", "fsdp2"} <= results.keys():
        ddp, fsdp = results["ddp"], results["fsdp2"]
        for name, key in COLUMNS[3:]:  # max over processes, FSDP2 / DDP
            ratios[name] = max(p[key] for p in fsdp["processes"]) / max(p[key] for p in ddp["processes"])
        ratios["train peak above start"] = (max(p["train_peak"] - p["start_rss"] for p in fsdp["processes"])
                                            / max(p["train_peak"] - p["start_rss"] for p in ddp["processes"]))
        ratios["step time"] = fsdp["step_s"] / ddp["step_s"]
        print("FSDP2 / DDP: " + ", ".join(f"{name} {value:.3f}" for name, value in ratios.items()))
    return ratios


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (each ~400 MB of float32 experts)")
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps (FSDP2: 25-45 s a step at 8 layers on 2 cores)")
    parser.add_argument("--variants", default="ddp,fsdp2", help="comma-separated, run in this order")
    parser.add_argument("--out", default="runs/bench/sharding_memory.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    if not set(args.variants) <= {"ddp", "fsdp2"}:
        parser.error("--variants: ddp and/or fsdp2")
    return args


def main(argv=None) -> None:
    from step_time import machine  # bench/ is on sys.path when this script runs

    args = parse_args(argv)
    start = time.perf_counter()
    results = {}
    for variant in args.variants:
        print(f"{variant}: {WORLD} gloo processes, {args.layers} layers, {args.batch} x {args.seq} tokens per "
              f"process, {args.warmup} + {args.steps} steps", flush=True)
        results[variant] = run_variant(variant, args)
        first = results[variant]["processes"][0]
        print(f"  {variant}: {results[variant]['wall_s']:.0f} s in all (build {first['build_s']:.0f} s, wrap "
              f"{first['wrap_s']:.0f} s, growth events at steps {first['events']})", flush=True)
    print("build: every process builds the whole model (so 'build' holds it once in both variants); 'wrapped': "
          "after DDP's wrap / FSDP2's sharding; peaks are VmHWM per phase")
    ratios = print_table(results)
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    report = {"command": "python bench/sharding_memory.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "torch": torch.__version__, "world": WORLD, "threads_per_process": 1,
              "model": dict(OLMOE, family="olmoe", num_hidden_layers=args.layers), "batch_per_process": args.batch,
              "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "results": results, "ratios": ratios,
              "wall_s": wall}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
