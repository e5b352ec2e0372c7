"""Step time and peak memory of expert LoRA: the floor, drlora uniform LoRA, DR-LoRA mid-growth and PEFT.

    python bench/step_time.py [--configs olmoe-e16,olmoe-e64,olmoe-e128,olmoe-h1024-e64,builtin]
                              [--steps 8] [--rank 32] [--keep-host-memory] [--interleave-configs] [--no-mkl-batch]
                              [--out runs/bench/step_time.json]

For each model config, five variants of the same model, batch and seed:

* (a) floor  — only the routers trainable: backward still runs through the whole network, so this is what any
  adapter pays at least;
* (b) lora   — drlora `allocation="fixed"`, every expert at r = r_max (mask all ones; no statistics, which fixed
  allocations never read);
* (c) dr-lora — drlora growing from r_init (= r_max / 4) of r_max: importance statistics on, `update_and_allocate`
  every step, one growth event in the first timed step; its matmuls run over the active width (the highest active
  rank, rounded up), as a real run's do early on;
* (c') dr-lora-wide — the same with one expert per layer at r_max, so the matmuls run r_max wide like (b)'s: c'/b
  is the cost of the DR-LoRA machinery alone (statistics, masks, update_and_allocate, the growth event);
* (c'') dr-lora-torch — (c) with drlora.mkl_batch switched off during its steps, so its grouped matmuls run on torch's
  grouped_mm as the floor's do: c/c'' is what MKL's batched GEMM saves, measured in the same rounds (not run unless
  named in --variants);
* (d) peft   — vanilla PEFT LoRA through `target_parameters` on the same fused expert weights, rank r.

Steps (forward + backward + AdamW step) are interleaved across the variants in one process, because this machine's
speed drifts; the table compares medians of the same rounds (with `--interleave-configs`, the rounds of all
configs are shared too, so the growth from E = 16 to E = 128 is measured drift-free as well). Peak memory is
measured separately, one fresh process per variant (its resident-set high-water mark during the steps, above what
the process held before the first step; on CUDA, torch's allocator peak). Ratios are printed and written as JSON;
timings are never asserted in tests.
By default the process keeps glibc's allocator settings, as a plain training script does; `--keep-host-memory`
applies `drlora train`'s default (drlora.host_memory: freed blocks stay in the process) to every variant alike.
drlora runs its grouped matmuls through MKL's batched GEMM on the CPU where experts get few rows (drlora.mkl_batch);
`--no-mkl-batch` puts them on torch's grouped_mm, as the floor's and PEFT's are, for a before/after.

PEFT adapts whole fused parameters: on experts that fuse gate and up (OLMoE, Qwen-MoE) it adapts gate_up_proj,
i.e. gate as well, while drlora adapts the projections in `--projections` (default up and down, its default).
Pass `--projections gate,up,down` for the variant that covers exactly PEFT's weights.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch

# name -> (transformers family, config overrides, batch, sequence length)
OLMOE_SHAPE = dict(hidden_size=512, intermediate_size=256, num_hidden_layers=4, num_experts_per_tok=8,
                   vocab_size=8192, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
CONFIGS = {
    "olmoe-e16": ("olmoe", dict(OLMOE_SHAPE, num_experts=16), 4, 128),
    "olmoe-e64": ("olmoe", dict(OLMOE_SHAPE, num_experts=64), 4, 128),
    "olmoe-e128": ("olmoe", dict(OLMOE_SHAPE, num_experts=128), 4, 128),
    "olmoe-h1024-e64": ("olmoe", dict(OLMOE_SHAPE, hidden_size=1024, intermediate_size=512, num_experts=64,
                                      num_attention_heads=16, num_key_value_heads=16), 4, 128),
    "builtin": ("builtin", {}, 8, 128),
}
VARIANTS = ("floor", "lora", "dr-lora", "dr-lora-wide", "dr-lora-torch", "peft")
DEFAULT_VARIANTS = ("floor", "lora", "dr-lora", "dr-lora-wide", "peft")


def build_base(name: str, dtype: torch.dtype, device: str):
    family, overrides, _, _ = CONFIGS[name]
    torch.manual_seed(0)
    if family == "builtin":
        from drlora.loading import load_model

        model, _ = load_model("builtin:smollm2-moe", dtype=dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(family, eos_token_id=None, bos_token_id=None, pad_token_id=None, **overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device).train()


def build_variant(variant: str, name: str, args):
    """The model of one variant and the per-step hook (DR-LoRA's update_and_allocate, or nothing)."""
    from drlora import DRLoRAConfig, get_dr_lora_model
    from drlora.layout import find_moe_layers

    base = build_base(name, args.dtype, args.device)
    projections = tuple(args.projections.split(","))
    if variant == "floor":
        for layer in find_moe_layers(base):
            for param in layer.router.parameters():
                param.requires_grad_(True)
        return base, None
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        from drlora.peft_export import fused_parameter_names

        names = fused_parameter_names(find_moe_layers(base), projections)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=[],
                            target_parameters=names, bias="none")
        return get_peft_model(base, config), None
    # (b) and (c) share one schedule: the router is gated during the untimed warmup rounds and trains in every
    # timed step, and (c)'s first growth event falls on the first timed step
    total = 1000
    common = dict(r_max=args.rank, lora_dropout=args.lora_dropout, target_projections=projections, train_router=True,
                  total_steps=total, warmup_ratio=args.warmup / total)
    if variant == "lora":
        config = DRLoRAConfig(allocation="fixed", r_init=args.rank, r_target=args.rank, **common)
    else:  # growing from r_max/4 toward r_max/2
        config = DRLoRAConfig(r_init=args.rank // 4, r_target=args.rank // 2, growth_interval=300, **common)
    model = get_dr_lora_model(base, config)
    if variant == "dr-lora-wide":  # one expert per layer already at r_max: the matmuls run r_max wide, as (b)'s
        for lora in model.expert_loras():
            lora.grow(torch.nn.functional.one_hot(torch.tensor(0), lora.num_experts) * (lora.r_max - config.r_init))
    return model, model.update_and_allocate


class TimedHook:
    """Times the per-step hook (DR-LoRA's update_and_allocate): its usual cost and the growth event's."""

    def __init__(self, hook):
        self.hook, self.seconds, self.event_seconds = hook, [], []

    def __call__(self, step: int) -> None:
        start = time.perf_counter()
        event = self.hook(step)
        (self.event_seconds if event is not None else self.seconds).append(time.perf_counter() - start)


def make_step(model, hook, batch, torch_kernels: bool = False):
    """One training step; with `torch_kernels`, drlora's grouped matmuls stay on torch's grouped_mm during it."""
    from drlora import mkl_batch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=batch.device.type in ("cpu", "cuda"))
    counter = iter(range(1 << 30))

    def step():
        enabled = mkl_batch.enabled
        mkl_batch.enabled = enabled and not torch_kernels
        try:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        finally:
            mkl_batch.enabled = enabled
        if hook is not None:
            hook(next(counter))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def token_batch(name: str, device: str) -> torch.Tensor:
    _, overrides, batch, length = CONFIGS[name]
    vocab = overrides.get("vocab_size", 49152)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_configs(names: list[str], args) -> dict[str, tuple[dict, dict]]:
    """Median step time of every variant of every named config, all their steps interleaved round by round."""
    steps, hooks = {}, {}
    for name in names:
        batch = token_batch(name, args.device)
        for variant in args.variants:
            model, hook = build_variant(variant, name, args)
            if hook is not None:
                hook = hooks[name, variant] = TimedHook(hook)
            steps[name, variant] = make_step(model, hook, batch, variant == "dr-lora-torch")
    times = {key: [] for key in steps}
    for round_index in range(args.warmup + args.steps):
        for key, step in steps.items():
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            if round_index >= args.warmup:
                times[key].append(time.perf_counter() - start)
        print(f"  {'+'.join(names)}: round {round_index + 1}/{args.warmup + args.steps}", flush=True)
    return {name: ({v: statistics.median(times[name, v]) for v in args.variants},
                   {v: {"median_step_s": statistics.median(h.seconds) if h.seconds else None,
                        "growth_event_s": h.event_seconds} for (n, v), h in hooks.items() if n == name})
            for name in names}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(variant: str, name: str, args, queue) -> None:
    set_up_process(args)
    batch = token_batch(name, args.device)
    model, hook = build_variant(variant, name, args)
    step = make_step(model, hook, batch, variant == "dr-lora-torch")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:  # reset the resident-set high-water mark
            clear.write("5")
        before = _rss_kib("VmRSS") * 1024
    for _ in range(3):
        step()
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else _rss_kib("VmHWM") * 1024
    queue.put((peak - before, peak))


def peak_memory(variant: str, name: str, args) -> tuple[int, int]:
    """(bytes above the model's own resident size, total peak bytes) over three steps, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_memory_child, args=(variant, name, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


RATIOS = {"b/a": ("lora", "floor"), "c/a": ("dr-lora", "floor"), "c/b": ("dr-lora", "lora"),
          "c'/b": ("dr-lora-wide", "lora"), "c/d": ("dr-lora", "peft"), "c'/d": ("dr-lora-wide", "peft"),
          "c/c''": ("dr-lora", "dr-lora-torch")}


def ratios(t: dict, m: dict) -> dict:
    out = {key: t[num] / t[den] for key, (num, den) in RATIOS.items() if num in t and den in t}
    if "dr-lora" in m and "peft" in m:
        out["memory c/d"] = m["dr-lora"][0] / m["peft"][0]
        out["total memory c/d"] = m["dr-lora"][1] / m["peft"][1]
    return out


def print_table(results: dict) -> None:
    variants = [v for v in VARIANTS if any(v in result["step_s"] for result in results.values())]
    header = f"{'config':<17}" + "".join(f"{v + ' s':>16}" for v in variants) + "".join(
        f"{k:>7}" for k in RATIOS) + f"{'mem c/d':>9}"
    print(header)
    for name, result in results.items():
        t, r = result["step_s"], result["ratios"]
        row = f"{name:<17}" + "".join(f"{t[v]:>16.3f}" if v in t else f"{'-':>16}" for v in variants)
        row += "".join(f"{r[k]:>7.3f}" if k in r else f"{'-':>7}" for k in RATIOS)
        row += f"{r['memory c/d']:>9.3f}" if "memory c/d" in r else f"{'-':>9}"
        print(row)
    names = [n for n in results if n.startswith("olmoe-e")]
    if len(names) >= 2:
        first, last = results[names[0]]["step_s"], results[names[-1]]["step_s"]
        growth = {v: last[v] / first[v] for v in variants if v in first and v in last}
        print(f"step-time growth {names[0]} -> {names[-1]}: " + ", ".join(f"{v} {g:.2f}x" for v, g in growth.items()))


def machine() -> str:
    """CPU model and core count (or the GPU's name), for the report."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="olmoe-e16,olmoe-e64,olmoe-e128,olmoe-h1024-e64,builtin",
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (each runs one step of every variant)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--rank", type=int, default=32, help="r_max of drlora and r of PEFT")
    parser.add_argument("--projections", default="up,down", help="expert projections drlora adapts")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="drlora's LoRA dropout (PEFT refuses dropout on parameters, so 0 compares like with like)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and LoRA dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--interleave-configs", action="store_true",
                        help="run the steps of all configs in the same rounds (every model in memory at once), so "
                             "the step-time growth across E compares medians of the same rounds too")
    parser.add_argument("--keep-host-memory", action="store_true",
                        help="keep freed host memory in the process for every variant, as `drlora train` does by "
                             "default (drlora.host_memory); without it, glibc's defaults, as in a plain script")
    parser.add_argument("--no-mkl-batch", action="store_true",
                        help="run drlora's grouped matmuls on torch's grouped_mm even where MKL's batched GEMM would "
                             "be used (drlora.mkl_batch; the same as DRLORA_MKL_BATCH=0)")
    parser.add_argument("--out", default="runs/bench/step_time.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    args.variants = [v for v in VARIANTS if v in args.variants.split(",")]
    args.dtype = getattr(torch, args.dtype)
    return args


def record(results: dict, name: str, step_s: dict, hook_s: dict, args) -> None:
    """Add one config's timings (and, unless --no-memory, its per-variant memory) to `results` and print them."""
    memory = {} if args.no_memory else {v: peak_memory(v, name, args) for v in args.variants}
    results[name] = {"step_s": step_s, "update_and_allocate": hook_s,
                     "memory_bytes": {v: {"above_model": m[0], "peak": m[1]} for v, m in memory.items()},
                     "ratios": ratios(step_s, memory)}
    print_table({name: results[name]})
    for variant, h in hook_s.items():
        events = ", ".join(f"{1e3 * s:.1f} ms" for s in h["growth_event_s"]) or "none timed"
        print(f"  {variant}: update_and_allocate {1e3 * (h['median_step_s'] or 0):.2f} ms per step; "
              f"growth event {events}", flush=True)


def set_up_process(args) -> str:
    """Threads, drlora's CPU kernels and host-memory policy, the same in the timing process and every memory process."""
    from drlora import mkl_batch

    torch.set_num_threads(args.threads)
    if args.no_mkl_batch:
        mkl_batch.enabled = False
    if args.keep_host_memory:
        from drlora.host_memory import keep_freed_host_memory

        return keep_freed_host_memory()
    return "host memory: glibc's defaults"


def main(argv=None) -> None:
    args = parse_args(argv)
    host_memory = set_up_process(args)
    print(host_memory, flush=True)
    results = {}
    names = args.configs.split(",")
    for group in [names] if args.interleave_configs else [[name] for name in names]:
        print(f"{' + '.join(group)}: timing {', '.join(args.variants)} ({args.warmup} + {args.steps} interleaved "
              "rounds)", flush=True)
        timed = time_configs(group, args)
        for name in group:
            record(results, name, *timed[name], args)
    print_table(results)
    report = {"command": "python bench/step_time.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "torch": torch.__version__, "threads": args.threads, "device": args.device,
              "host_memory": host_memory, "mkl_batch": not args.no_mkl_batch,
              "interleaved_configs": args.interleave_configs,
              "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "ONEDNN_", "OMP_"))},
              "dtype": str(args.dtype), "rank": args.rank, "projections": args.projections,
              "lora_dropout": args.lora_dropout, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
