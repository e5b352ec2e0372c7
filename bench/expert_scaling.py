"""Why a training step grows with the expert count E at a fixed number of tokens, and what the kernels change.

    python bench/expert_scaling.py [--experts 16,128] [--rounds 20] [--skip-steps]

`bench/step_time.py` measures that the step grows from E = 16 to E = 128 (OLMoE shape: H = 512, I = 256, top-8,
512 tokens, so N = 4,096 routed rows per layer at every E). This script takes the growth apart, in three parts:

1. **Bytes.** The frozen expert weights grow with E, and every step reads them at least twice (forward, and the
   input gradient in the backward). Their size against the machine's measured read bandwidth gives a lower bound
   on the floor's growth that no kernel can beat.
2. **Products.** Every grouped matmul of one layer — the base's four and the six of one expert LoRA (on `up`, at
   width r) — timed at each E, interleaved round by round so drift hits every E alike, on torch's `grouped_mm` and
   on MKL's batched GEMM (drlora.mkl_batch, which drlora uses on the CPU in float32 up to
   `mkl_batch.MAX_MEAN_ROWS` rows per expert). torch's CPU `grouped_mm` runs one `mm` per expert, so at E = 128 a
   product of the same FLOPs is 128 small matmuls (32 rows each) instead of 16 larger ones.
3. **Calls.** The `aten::mm` calls one training step issues (the profiler's count; the few dense matmuls of
   attention and the LM head are among them) for the floor and for DR-LoRA, built exactly as in step_time.py.
   Every per-expert matmul of torch's `grouped_mm` is one of them; MKL's batched GEMM is not, so where drlora uses
   it only the dense ones remain.

Timings are never asserted anywhere; these machines are noisy, which is why the products are interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from drlora import mkl_batch
from drlora.grouped import route
from drlora.host_memory import keep_freed_host_memory
from layer_parts import interleaved
from step_time import CONFIGS, build_variant, make_step, parse_args, token_batch

HIDDEN, INTER, TOKENS, TOP_K, LAYERS = 512, 256, 512, 8, 4  # olmoe-e* of step_time.py


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second that `sum` reads from a tensor far larger than the caches (best of five)."""
    big = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


def weight_bytes_per_step(experts: int) -> int:
    """fp32 expert weights read in one step: gate_up and down, forward in every layer, backward in all but the first."""
    per_layer = experts * (2 * INTER * HIDDEN + HIDDEN * INTER) * 4
    return per_layer * (LAYERS + LAYERS - 1)


def layer_products(experts: int, rank: int, kernel: str) -> dict:
    """Callables for every grouped matmul of one layer at `experts` experts — the base's four, one LoRA's six — on
    torch's `grouped_mm` (kernel "torch") or MKL's batched GEMM (kernel "mkl", drlora.mkl_batch)."""
    torch.manual_seed(0)
    routed = route(torch.topk(torch.randn(TOKENS, experts), TOP_K).indices, experts)
    offs, rows = routed.offsets, TOKENS * TOP_K
    if kernel == "torch":
        def rows_mm(a, w):
            return F.grouped_mm(a, w, offs=offs)

        def outer(a, b):
            return F.grouped_mm(a.t(), b, offs=offs)
    else:
        def rows_mm(a, w):
            return mkl_batch.rows_times_weights(a, w, routed.ranges)

        def outer(a, b):
            return mkl_batch.outer_sums(a, b, routed.ranges)
    x, hidden = torch.randn(rows, HIDDEN), torch.randn(rows, INTER)
    grad_up, grad_down = torch.randn(rows, 2 * INTER), torch.randn(rows, HIDDEN)
    gate_up, down = torch.randn(experts, 2 * INTER, HIDDEN), torch.randn(experts, HIDDEN, INTER)
    lora_a, lora_b = torch.randn(experts, rank, HIDDEN), torch.randn(experts, INTER, rank)
    h, grad_h, grad_y = torch.randn(rows, rank), torch.randn(rows, rank), torch.randn(rows, INTER)
    return {
        "base gate_up forward": lambda: rows_mm(x, gate_up.transpose(1, 2)),
        "base gate_up input grad": lambda: rows_mm(grad_up, gate_up),
        "base down forward": lambda: rows_mm(hidden, down.transpose(1, 2)),
        "base down input grad": lambda: rows_mm(grad_down, down),
        "lora x·Aᵀ": lambda: rows_mm(x, lora_a.transpose(1, 2)),
        "lora h·Bᵀ": lambda: rows_mm(h, lora_b.transpose(1, 2)),
        "lora ∂y·B": lambda: rows_mm(grad_y, lora_b),
        "lora ∂h·A": lambda: rows_mm(grad_h, lora_a),
        "lora ∂A = ∂hᵀ·x": lambda: outer(grad_h, x),
        "lora ∂B = ∂yᵀ·h": lambda: outer(grad_y, h),
    }


def matmuls_per_step(variant: str, experts: int, rank: int) -> int:
    """`aten::mm` calls in one training step of a step_time.py variant (after two warm-up steps)."""
    args = parse_args(["--configs", f"olmoe-e{experts}", "--rank", str(rank), "--no-memory"])
    name = f"olmoe-e{experts}"
    model, hook = build_variant(variant, name, args)
    step = make_step(model, hook, token_batch(name, "cpu"))
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::mm")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="16,128", help="comma-separated expert counts; the first is the base")
    parser.add_argument("--rank", type=int, default=32, help="LoRA width of the timed products")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of the products")
    parser.add_argument("--skip-steps", action="store_true", help="skip part 3 (it builds two models per E)")
    args = parser.parse_args(argv)
    counts = [int(e) for e in args.experts.split(",")]
    missing = [e for e in counts if f"olmoe-e{e}" not in CONFIGS]
    if missing and not args.skip_steps:
        parser.error(f"part 3 has no step_time.py config with E={missing[0]}; use E from "
                     f"{', '.join(c[7:] for c in CONFIGS if c.startswith('olmoe-e'))} or pass --skip-steps")
    print(keep_freed_host_memory(), flush=True)  # as `drlora train` does: no page faults on every product's output
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={HIDDEN}, I={INTER}, {TOKENS} tokens, "
          f"top-{TOP_K}, {LAYERS} layers, r={args.rank}", flush=True)

    bandwidth = read_bandwidth()
    print(f"\n1. read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for experts in counts:
        size = weight_bytes_per_step(experts)
        print(f"   E={experts:<4} expert weights read per step {size / 1e9:.2f} GB: at least "
              f"{1e3 * size / bandwidth:.0f} ms", flush=True)

    kernels = ["torch"] + (["mkl"] if mkl_batch.available() else [])
    print(f"\n2. one layer's grouped matmuls, ms (median of {args.rounds} interleaved rounds); torch's grouped_mm"
          + (" and MKL's batched GEMM (drlora.mkl_batch)" if len(kernels) > 1 else " (MKL's batched GEMM unavailable)"))
    columns = [(k, e) for k in kernels for e in counts]
    products = {(k, e): layer_products(e, args.rank, k) for k, e in columns}
    medians = interleaved({(k, e, name): run for (k, e), runs in products.items() for name, run in runs.items()},
                          args.rounds)
    print(f"   {'product':<26}" + "".join(f"{k + ' E=' + str(e):>13}" for k, e in columns)
          + "".join(f"{k + ' growth':>13}" for k in kernels))
    totals = {}
    for name in products[columns[0]]:
        row = [medians[k, e, name] for k, e in columns]
        part = name.split()[0]
        for (kernel, experts), ms in zip(columns, row, strict=True):
            totals[part, kernel, experts] = totals.get((part, kernel, experts), 0.0) + ms
        growth = [medians[k, counts[-1], name] / medians[k, counts[0], name] for k in kernels]
        print(f"   {name:<26}" + "".join(f"{ms:>13.2f}" for ms in row) + "".join(f"{g:>12.2f}x" for g in growth))
    for part in ("base", "lora"):
        row = [totals[part, k, e] for k, e in columns]
        growth = [totals[part, k, counts[-1]] / totals[part, k, counts[0]] for k in kernels]
        print(f"   {part + ' total':<26}" + "".join(f"{ms:>13.2f}" for ms in row)
              + "".join(f"{g:>12.2f}x" for g in growth))

    if not args.skip_steps:
        print("\n3. aten::mm calls in one training step")
        for variant in ("floor", "dr-lora"):
            calls = [matmuls_per_step(variant, e, args.rank) for e in counts]
            cells = "".join(f"  E={e}: {c:>6,}" for e, c in zip(counts, calls, strict=True))
            print(f"   {variant:<8}{cells}", flush=True)


if __name__ == "__main__":
    main()
