"""Where the time of one MoE layer goes: drlora's pieces against the obvious way to write each, one layer at a time.

    python bench/layer_parts.py [--experts 64] [--tokens 512] [--top-k 8] [--hidden 512] [--intermediate 256]

Each line times forward + backward of one piece on the routed rows of one OLMoE-shaped layer (T tokens, top-k of E
experts, N = T·k routed rows), interleaved round by round with the piece it replaces, and prints the medians and
their ratio. `bench/step_time.py` measures whole training steps; this script explains them:

* dispatch + combine — tokens to expert-sorted rows and back: plain indexing (what transformers' grouped_mm
  experts path does; its backward is an accumulating index_put) against drlora.grouped's gathers;
* expert LoRA on `up` at the full width r_max and at an early DR-LoRA width (r_init active), with and without the
  importance statistics, against plain autograd over the same grouped matmuls with hooks on the parameters (and,
  for scale, the frozen `up` product it is added to);
* LoRA dropout on the routed rows — drlora's 16-bit mask against nn.Dropout's Bernoulli draw.

Timings are never asserted anywhere; these machines are noisy, which is why every comparison is interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from drlora.grouped import combine, dispatch, route
from drlora.layer import ExpertLoRA


def interleaved(candidates: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each callable, run one after another in every round."""
    times = {name: [] for name in candidates}
    for index in range(warmup + rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    (base_name, base), *others = medians.items()
    parts = [f"{base_name} {base:.2f} ms"] + [f"{name} {ms:.2f} ms ({ms / base:.2f}x)" for name, ms in others]
    print(f"{title:<34} " + " | ".join(parts), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--r-max", type=int, default=32)
    parser.add_argument("--r-init", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    experts, hidden, inter = args.experts, args.hidden, args.intermediate
    top_k_index = torch.topk(torch.randn(args.tokens, experts), args.top_k).indices
    routed = route(top_k_index, experts)
    rows = routed.expert_ids.numel()
    print(f"T={args.tokens} tokens, top-{args.top_k} of E={experts}: N={rows} routed rows; H={hidden}, "
          f"I={inter}, r_max={args.r_max}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    hidden_states = torch.randn(args.tokens, hidden, requires_grad=True)
    grad_tokens = torch.randn(args.tokens, hidden)
    slot_of_row, row_of_slot = routed.slot_of_row, routed.row_of_slot

    def indexing():
        x = hidden_states[slot_of_row // args.top_k]
        out = (x * 1.5)[row_of_slot].view(args.tokens, args.top_k, hidden).sum(1)
        out.backward(grad_tokens)

    def gathers():
        combine(dispatch(hidden_states, routed) * 1.5, routed).backward(grad_tokens)

    report("dispatch + combine", interleaved({"indexing": indexing, "drlora": gathers}, args.rounds))

    x = torch.randn(rows, hidden, requires_grad=True)
    base_out = torch.randn(rows, inter, requires_grad=True)
    grad_out = torch.randn(rows, inter)

    def lora_module(active: int, dropout: float = 0.0) -> ExpertLoRA:
        lora = ExpertLoRA(experts, hidden, inter, args.r_max, active, 2.0, dropout, 0, torch.float32,
                          torch.device("cpu")).train()
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.01).mul_(lora.rank_mask.unsqueeze(1))
        return lora

    def drlora_step(lora: ExpertLoRA, inputs=None):
        def run():
            lora.add_to(base_out * 1.0, x if inputs is None else inputs(), routed).backward(grad_out)
            x.grad = base_out.grad = lora.lora_A.grad = lora.lora_B.grad = None
        return run

    def autograd_step(lora: ExpertLoRA):
        """The same LoRA through plain autograd: full r_max width, masked h, statistics by parameter hooks."""
        sums = torch.zeros(2, experts, args.r_max)

        def hook_a(grad):
            sums[0].add_((grad * lora.lora_A).sum(-1))

        def hook_b(grad):
            sums[1].add_((grad * lora.lora_B).sum(-2))

        lora.lora_A.register_hook(hook_a)
        lora.lora_B.register_hook(hook_b)

        def run():
            offsets = routed.offsets
            h = F.grouped_mm(x, lora.lora_A.transpose(1, 2), offs=offsets)
            scale = (lora.rank_mask.float() * lora.scaling)[routed.expert_ids]
            y = F.grouped_mm(h * scale, lora.lora_B.transpose(1, 2), offs=offsets)
            (base_out + y).backward(grad_out)
            x.grad = base_out.grad = lora.lora_A.grad = lora.lora_B.grad = None
        return run

    weight = torch.randn(experts, inter, hidden) / hidden**0.5

    def base_projection():  # what the LoRA is added to: the frozen `up` product, forward and input gradient
        F.grouped_mm(x, weight.transpose(1, 2), offs=routed.offsets).backward(grad_out)
        x.grad = None

    report("base up projection (reference)", interleaved({"grouped_mm": base_projection}, args.rounds))
    for active in (args.r_max, args.r_init):
        tracked, untracked = lora_module(active), lora_module(active)
        untracked.track_importance = False
        medians = interleaved({"autograd + hooks": autograd_step(lora_module(active)),
                               "drlora": drlora_step(tracked), "drlora, no statistics": drlora_step(untracked)},
                              args.rounds)
        report(f"expert LoRA (up), {active} of {args.r_max} active", medians)

    plain, dropped = lora_module(args.r_init), lora_module(args.r_init, dropout=0.1)
    medians = interleaved({"no dropout": drlora_step(plain),
                           "nn.Dropout": drlora_step(plain, lambda: F.dropout(x, 0.1, training=True)),
                           "drlora dropout": drlora_step(dropped)}, args.rounds)
    report("LoRA dropout 0.1 (with the LoRA)", medians)


if __name__ == "__main__":
    main()
