"""The prepared GPU check: drlora's bf16 CUDA path against a float32 reference at real layer shapes, in one command.

    python bench/gpu_check.py [--out runs/gpu_check] [--families olmoe,qwen3_moe] [--skip-timing]
    python bench/gpu_check.py --dry-run            # the same checks on the CPU at tiny shapes (tests/test_gpu_check.py)

On a machine with one CUDA GPU (bf16 grouped_mm needs SM >= 8.0): `pip install -e .` into an environment with a
CUDA torch (>= 2.10), then `python bench/gpu_check.py --out runs/gpu_check`. It prints one line per check as it
goes and a summary table at the end, exits 0 only if every check passed, and writes `OUT/gpu_check.json` (every
number, the command, date, machine and versions; rewritten after every family, so a run cut short still leaves what
it measured). Its numbers go to docs/PERFORMANCE.md, section "GPU" (filled from the JSON: the table of checks, the
free-routing errors, the timing ratios). Without a CUDA GPU it refuses unless --dry-run.

Why a script and not tests: the test suite runs on CPUs, where bf16 runs torch's per-group loop, not the CUTLASS
kernel a GPU runs, and at tiny shapes, where every expert gets a handful of rows. This runs every family of tests/
(plus qwen3_moe) as ONE decoder layer at a real model's layer shape (vocabulary 1024, 4 x 512 tokens, so experts get
real row counts) and checks, per family:

a. bf16 against float32: the float32 model with DR-LoRA (ranks 8..12 of 32 differing per expert, B random on the
   active ranks, scaled so that the LoRA moves the logits by 20 % of their norm: it matters) and the same model in
   bf16 (the same base weights cast to bf16, the same float32 LoRA factors, adapter_dtype="float32"): relative L2
   error of the logits and of every LoRA factor's gradient after one backward, with both models given the float32
   model's routing (bf16 rounding flips near-tied tokens to other experts — 2-19 tokens of 64-256 at these shapes,
   moving a factor's gradient by up to 12 % — which is the bf16 model's behaviour, not drlora's arithmetic; the
   free-routing errors and flips are printed and kept in the JSON); and whether the bf16 pass ran torch's grouped_mm
   kernel or fell back to drlora's per-expert loop (drlora.grouped logs a warning when it falls back; on a GPU in
   bf16 that is a performance failure). The float32 reference itself runs that loop on CUDA (grouped_mm is bf16-only
   there), so drlora's fallback warning may be printed once for it: expected, and not counted.
b. growth is function-preserving on the device: after 2 AdamW steps (B != 0), `grow` on every expert LoRA (widening
   the active width) leaves the bf16 logits bit-identical (torch.equal).
c. export on the device in bf16: `export_peft`, then `peft.PeftModel.from_pretrained` on a fresh bf16 base
   reproduces the logits, and so do PEFT's `merge_and_unload()` and drlora's own `merge_and_unload()`.
d. the learning test of issue point 1 (tests/test_mixed_precision.py `run()`), in bf16 at the paper's lr 2e-5:
   after 5 AdamW steps >= 95 % of the active A entries and of the router's entries have moved.
e. timing (--skip-timing skips it): floor / drlora uniform r32 / DR-LoRA r 8 of 32 / PEFT r32 steps in bf16 on the
   issue's three shapes, interleaved round by round, by bench/step_time.py's own `build_variant`, `make_step` and
   `time_configs`: this script registers its configs in `step_time.CONFIGS` (as "gpu-<family>") and prints
   step_time's table and ratios (b/a, c/a, c/b, c/d).

Shapes (one layer each; `REAL` below): OLMoE-1B-7B H2048/I1024/E64/top-8; Qwen3-30B-A3B H2048/I768/E128/top-8;
GPT-OSS-20B H2880/I2880/E32/top-4; Qwen1.5-MoE-A2.7B H2048/I1408/E60/top-4 (+ shared expert 5632) for qwen2_moe;
Mixtral-8x7B H4096/I14336/E8/top-2 unscaled (1.46 B parameters, 5.4 GiB in float32: the largest model here, under 20
GB with all its copies); DeepSeek-V3 scaled from H7168/I2048/E256 (one layer ~11 B parameters) to H2048/I1024/E64,
top-8, 8 groups of which 4 are picked, 16 heads. --dry-run uses H 64, I 32, E 8, top-2, 2 x 16 tokens and 1 warmup + 2
timed rounds.

Budget on an H200 (~990 dense bf16 TFLOP/s, ~60 float32 TFLOP/s without TF32), total well under 5 minutes: a training
step of one layer is 6 x (active expert + attention parameters) x 2048 tokens = 0.6 TFLOP (OLMoE) to 4.4 TFLOP
(Mixtral; 0.07 s in float32) — so the GPU arithmetic is seconds for the whole run (per family: 5 float32 and ~15 bf16
passes). What costs time is the host: imports and CUDA start (~15 s), building the models (done on the GPU,
`torch.device` context, < 1 s each), the float32 reference's per-expert loop (drlora's fallback for float32 on CUDA:
one small GEMM per expert and product, ~0.1 s), PEFT export and load (tensors copied to the host and written, ~2 s at
E = 128): ~10 s per family, ~60 s for six. Timing builds step_time's models on the host (step_time.build_base; 12
models of 0.4-0.8 B parameters, ~2 s each) and runs 2 warmup + 8 timed rounds of 4 steps (each < 0.1 s): ~40 s. So ~2
minutes in all; every part's seconds are printed and kept in the JSON.

The bounds (`BOUNDS`) are set where bf16 rounding does not reach and a wrong result (a missed rank, a wrong slice, a
stale cast) lands beyond: bf16 keeps 8 significant bits (relative step 2^-8 = 0.0039). One rank of one expert left out
of the bf16 model moved a factor's gradient by 16-22 % at the tiny shapes (bound 5 %). Before any GPU run, the checks
a-d were run at these real shapes on the project's 2-core CPU (2026-12-02; 64 or 256 tokens instead of 2048, every
family but Mixtral, 2.5-8.5 min each): all passed, logits error 0.008-0.013, worst factor gradient error 0.011-0.017,
PEFT 1-2 bf16 steps, growth bit-identical, 96-100 % of A entries and 100 % of router entries moved (at 64 tokens some
experts get no token in some steps; at 2048 they get 128-512 rows a step on average).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ is not a package: import step_time as a script
import step_time  # noqa: E402

_COMMON = dict(num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096)
# family -> config overrides of one realistic decoder layer (see the module docstring for the models they are from)
REAL: dict[str, dict] = {
    "olmoe": dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_attention_heads=16, num_key_value_heads=16),
    "qwen2_moe": dict(hidden_size=2048, moe_intermediate_size=1408, num_experts=60, num_experts_per_tok=4,
                      shared_expert_intermediate_size=5632, intermediate_size=5632, num_attention_heads=16,
                      num_key_value_heads=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8),
    # scaled from DeepSeek-V3's H7168/I2048/E256/128 heads, whose one layer (~11 B parameters) is too big to matter
    "deepseek_v3": dict(hidden_size=2048, moe_intermediate_size=1024, n_routed_experts=64, num_experts_per_tok=8,
                        n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=0, intermediate_size=4096,
                        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
    "gpt_oss": dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                    layer_types=["full_attention"]),
}
_TINY_COMMON = dict(num_hidden_layers=1, vocab_size=128, max_position_embeddings=64, hidden_size=64,
                    num_attention_heads=4, num_key_value_heads=2)
# --dry-run: the same families at H 64, I 32, E 8, top-2 (every stride 16-byte aligned in bf16, as tests/ keep them)
TINY: dict[str, dict] = {
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=64, intermediate_size=64, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, intermediate_size=64,
                      head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        n_shared_experts=1, first_k_dense_replace=0, intermediate_size=64, num_key_value_heads=4,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["full_attention"]),
}
FAMILIES = tuple(REAL)
TIMING_FAMILIES = ("olmoe", "qwen3_moe", "gpt_oss")  # the three shapes
TIMING_VARIANTS = ("floor", "lora", "dr-lora", "peft")

BOUNDS = {
    # one bf16 layer against float32, the routing pinned (see `routing`): measured 0.008-0.013 at the real shapes on
    # a CPU (torch's bf16 kernels, float32 accumulation; 64-256 tokens), ~0.005 at the tiny ones: every bf16 rounding
    # from the embedding to the logits adds up. A LoRA computed wrongly moves them by up to `lora_effect` x 2
    "logits_rel": 3e-2,
    "grad_rel": 5e-2,  # per LoRA factor: measured 0.011-0.017 at the real shapes on a CPU, ~0.01 at the tiny ones
    # PEFT computes W + ΔW and rounds it to bf16 once, drlora adds the bf16 LoRA product to the bf16 base product:
    # the two roundings differ by a few bf16 steps of the largest logit (tests: 0.002 at logits up to 0.42; measured
    # here 1-2 steps at every shape on a CPU)
    "peft_ulps": 8,
    "merged_ulps": 16,  # ΔW rounded into the bf16 weights: one more rounding of every weight
    "moved": 0.95,
    # B is scaled so that the LoRA moves the float32 logits by twice this: well above the logits bound, so a LoRA
    # computed wrongly in bf16 cannot hide under it
    "lora_effect": 0.1,
}
R_MAX, R_INIT, R_TARGET = 32, 8, 16
B_STD = 0.02  # random B's first std, before lora_effect scales it


def cuda_device() -> str:
    return "cuda" if torch.cuda.is_available() else ""


def config_of(family: str, overrides: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, eos_token_id=None, bos_token_id=None, pad_token_id=None, **overrides)


def build_base(family: str, overrides: dict, dtype, device: str, state: dict | None = None):
    """A frozen one-layer model, built on `device` (random init on the GPU is instant, on the host it is not), with
    `state` (the float32 reference weights) copied in, cast to each tensor's own dtype, when given."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_of(family, overrides), dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def reference_state(family: str, overrides: dict, device: str) -> dict:
    """The float32 weights every model of a family starts from. DeepSeek-V3's routing bias is set as real checkpoints
    have it (close, non-zero; tests/test_mixed_precision.py): its float32 precision decides which experts are picked."""
    torch.manual_seed(0)
    model = build_base(family, overrides, torch.float32, device)
    if family == "deepseek_v3":
        generator = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.5 + 0.002 * torch.randn(bias.shape, generator=generator))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tokens(seed: int, shape: tuple[int, int], vocab: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bf16_step(value: float) -> float:
    """The spacing of bf16 numbers at `value` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - 7)


@torch.no_grad()
def eval_logits(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=x).logits.float()


class KernelWatch(logging.Handler):
    """Counts torch's grouped_mm calls and captures drlora.grouped's fallback warning within a `with` block.

    drlora.grouped warns once per process; the flag is reset on entry so that every family's bf16 pass can show it.
    """

    def __init__(self):
        super().__init__(logging.WARNING)
        self.calls, self.fallbacks = 0, []

    def __enter__(self):
        import torch.nn.functional as F

        from drlora import grouped

        if hasattr(grouped, "_warned_fallback"):
            grouped._warned_fallback = False
        self._logger = logging.getLogger(grouped.__name__)
        self._logger.addHandler(self)
        self._F, self._original = F, getattr(F, "grouped_mm", None)
        if self._original is not None:
            def counted(*args, **kwargs):
                self.calls += 1
                return self._original(*args, **kwargs)
            F.grouped_mm = counted
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        if self._original is not None:
            self._F.grouped_mm = self._original

    def emit(self, record: logging.LogRecord) -> None:
        self.fallbacks.append(record.getMessage())


class Report:
    """The checks' rows, the timings and the run's metadata; written as JSON after every family."""

    def __init__(self, args, argv):
        import peft
        import transformers

        import drlora

        self.path = os.path.join(args.out, "gpu_check.json")
        self.data = {"command": "python bench/gpu_check.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d"),
                     "machine": step_time.machine(), "device": args.device, "dry_run": args.dry_run,
                     "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "transformers": transformers.__version__,
                                  "peft": peft.__version__, "drlora": drlora.__version__,
                                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
                     "tokens": list(args.tokens), "ranks": {"r_init": R_INIT, "r_max": R_MAX},
                     "bounds": BOUNDS, "shapes": {f: {**args.common, **args.shapes[f]} for f in args.families},
                     "checks": [], "details": {}, "timing": {}, "seconds": {}}

    @property
    def checks(self) -> list[dict]:
        return self.data["checks"]

    def check(self, name: str, family: str, value, bound: str, passed: bool) -> None:
        self.checks.append({"check": name, "family": family, "value": value, "bound": bound, "passed": bool(passed)})
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"  {'PASS' if passed else 'FAIL'}  {family:<12} {name:<36} {shown:<24} {bound}", flush=True)

    def write(self) -> None:
        self.data["passed"] = bool(self.checks) and all(c["passed"] for c in self.checks)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as handle:
            json.dump(self.data, handle, indent=2)
        os.replace(self.path + ".tmp", self.path)

    def summary(self) -> None:
        print(f"\n{'check':<36} {'family':<12} {'value':>24}  {'bound':<30} result")
        for c in self.checks:
            value = f"{c['value']:.3g}" if isinstance(c["value"], float) else str(c["value"])
            result = "PASS" if c["passed"] else "FAIL"
            print(f"{c['check']:<36} {c['family']:<12} {value:>24}  {c['bound']:<30} {result}")
        failed = sum(not c["passed"] for c in self.checks)
        print(f"{len(self.checks) - failed} of {len(self.checks)} checks passed; wrote {self.path}", flush=True)


def lora_config(**overrides):
    from drlora import DRLoRAConfig

    values = dict(r_init=R_INIT, r_target=R_TARGET, r_max=R_MAX, lora_dropout=0.0, total_steps=1000,
                  growth_interval=100, warmup_ratio=0.0)  # router trained from step 0, no event unless asked
    return DRLoRAConfig(**{**values, **overrides})


def loss_and_grads(model, x):
    """One train-mode forward and backward: (logits, {factor: gradient}, router gradients); gradients cleared after."""
    model.train()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    grads = {}
    for adapter in model.adapters:
        for projection, lora in adapter.projections.items():
            grads[f"L{adapter.layer_index}.{projection}.A"] = lora.lora_A.grad.float().clone()
            grads[f"L{adapter.layer_index}.{projection}.B"] = lora.lora_B.grad.float().clone()
    routers = [layer.router.weight.grad for layer in model.moe_layers]
    routers = [None if r is None else r.float().clone() for r in routers]
    model.zero_grad(set_to_none=True)
    return out.logits.detach().float(), grads, routers


def dr_lora_layer_model(family: str, dtype, state: dict, args):
    """The family's layer model in `dtype` with DR-LoRA, ranks 8..12 of 32 differing per expert (B still zero)."""
    from drlora import get_dr_lora_model

    model = get_dr_lora_model(build_base(family, {**args.common, **args.shapes[family]}, dtype, args.device, state),
                              lora_config())
    for lora in model.expert_loras():
        lora.grow(torch.arange(lora.num_experts) % 5)
    return model


@torch.no_grad()
def set_random_b(model, std: float) -> None:
    """B random on the active ranks (masked ones stay zero), the same values in every dtype's model."""
    generator = torch.Generator().manual_seed(1)
    for lora in model.expert_loras():
        noise = torch.randn(lora.lora_B.shape, generator=generator).to(lora.lora_B)
        lora.lora_B.copy_(noise * std * lora.rank_mask.unsqueeze(1))


def lora_effect(model, x: torch.Tensor, base_logits: torch.Tensor, target: float) -> tuple[float, float]:
    """Scale random B so that the LoRA moves the logits by about `target` of their norm (so that a LoRA computed
    wrongly shows in the logits, not only in the gradients): returns (B's std, the effect it has).

    The effect grows like std^p with p between 1 and 2 (the up and down LoRAs multiply), so one secant step in
    log-log after a linear guess lands close to the target."""
    def effect(std: float) -> float:
        set_random_b(model, std)
        return max(rel(eval_logits(model, x), base_logits), 1e-12)

    std0, effect0 = B_STD, effect(B_STD)
    std1 = std0 * target / effect0
    effect1 = effect(std1)
    power = math.log(effect1 / effect0) / math.log(std1 / std0) if abs(math.log(std1 / std0)) > 1e-3 else 1.0
    std = std1 * (target / effect1) ** (1 / max(power, 0.5))
    return std, effect(std)


@contextlib.contextmanager
def routing(model, pinned: list | None = None):
    """Within the block, record the (top_k_index, top_k_weights) every MoE layer's experts receive into the yielded
    list, or, given `pinned`, hand the experts those instead (weights cast to the dtype the router produced).

    Why pinned: the bf16 router's logits differ from float32's by rounding, so near-tied tokens pick another expert;
    at the tiny shape one token of 32 doing so moves a LoRA factor's gradient by 10-25 %. That is what a bf16 model
    computes, not an error of drlora's arithmetic, so the bounded comparison gives both models the float32 routing
    (the free-routing numbers are reported beside it)."""
    seen, handles = [], []

    def hook(index):
        def pre_hook(module, args):
            hidden, top_k_index, top_k_weights = args  # transformers calls experts(hidden, index, weights)
            seen.append((top_k_index.detach().clone(), top_k_weights.detach().clone()))
            if pinned is not None:
                return hidden, pinned[index][0], pinned[index][1].to(top_k_weights.dtype)
        return pre_hook

    try:
        for index, layer in enumerate(model.moe_layers):
            handles.append(layer.experts.register_forward_pre_hook(hook(index)))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def flipped_tokens(choices: list, reference: list) -> int:
    """Tokens whose set of experts differs from the reference routing, summed over the MoE layers."""
    pairs = zip(choices, reference, strict=True)
    return sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum()) for (a, _), (b, _) in pairs)


def check_bf16_against_float32(report: Report, family: str, state: dict, x: torch.Tensor, args):
    """a. Returns the bf16 DR-LoRA model (ranks differing per expert, B random) for b and c."""
    model32 = dr_lora_layer_model(family, torch.float32, state, args)
    b_std, effect = lora_effect(model32, x, eval_logits(model32, x), BOUNDS["lora_effect"] * 2)
    with routing(model32) as routed32:
        logits32, grads32, routers32 = loss_and_grads(model32, x)
    del model32
    model = dr_lora_layer_model(family, torch.bfloat16, state, args)
    set_random_b(model, b_std)
    with routing(model) as routed:
        free_logits, free_grads, routers = loss_and_grads(model, x)
    with KernelWatch() as watch, routing(model, pinned=routed32):
        logits, grads, _ = loss_and_grads(model, x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    grad_errors = {name: rel(grads[name], grads32[name]) for name in grads32}
    free = {"flipped_tokens": flipped_tokens(routed, routed32), "tokens": x.numel() * len(routed32),
            "logits_rel": rel(free_logits, logits32),
            "grad_rel": {name: rel(free_grads[name], grads32[name]) for name in grads32},
            "router_grad_rel": [rel(a, b) for a, b in zip(routers, routers32, strict=True)
                                if a is not None and b is not None]}
    report.data["details"][family] = {"lora_effect_on_logits": effect, "b_std": b_std, "grad_rel": grad_errors,
                                      "free_routing": free, "grouped_mm_calls": watch.calls,
                                      "fallback_warnings": watch.fallbacks, "ranks": model.rank_map().tolist()}
    print(f"  {family}: the LoRA moves the float32 logits by {effect:.3g} of their norm; with bf16's own routing "
          f"{free['flipped_tokens']} of {free['tokens']} tokens pick other experts, logits error "
          f"{free['logits_rel']:.3g}, worst LoRA gradient error {max(free['grad_rel'].values()):.3g}, router "
          f"gradient error {', '.join(f'{r:.3g}' for r in free['router_grad_rel'])}", flush=True)
    report.check("a LoRA effect on logits (rel)", family, effect, f">= {BOUNDS['lora_effect']}",
                 effect >= BOUNDS["lora_effect"])
    value = rel(logits, logits32)
    report.check("a logits bf16 vs fp32 (rel L2)", family, value, f"< {BOUNDS['logits_rel']}",
                 value < BOUNDS["logits_rel"])
    worst = max(grad_errors, key=grad_errors.get)
    report.check(f"a LoRA grads (worst: {worst})", family, grad_errors[worst], f"< {BOUNDS['grad_rel']} each",
                 grad_errors[worst] < BOUNDS["grad_rel"])
    kernel = f"grouped_mm x{watch.calls}" if not watch.fallbacks else "FALLBACK: " + watch.fallbacks[0][:60]
    report.check("a bf16 kernel", family, kernel, "grouped_mm, no fallback", watch.calls > 0 and not watch.fallbacks)
    return model


def check_growth(report: Report, family: str, model, x: torch.Tensor, args) -> None:
    """b. Two AdamW steps (B moves), then grow every expert LoRA: the bf16 logits must not change by one bit."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(2):
        batch = tokens(100 + step, tuple(args.tokens), args.common["vocab_size"], args.device)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del optimizer
    before = eval_logits(model, x)
    repeat = torch.equal(eval_logits(model, x), before)  # a non-deterministic forward would fail growth wrongly
    widths = [lora.rank_scale(torch.bfloat16).shape[1] for lora in model.expert_loras()]
    with torch.no_grad():
        for lora in model.expert_loras():
            lora.grow((torch.arange(lora.num_experts) % 3) * 4)  # up to 20 of 32: the active width widens
    after = eval_logits(model, x)
    widths_after = [lora.rank_scale(torch.bfloat16).shape[1] for lora in model.expert_loras()]
    report.data["details"][family].update(growth_widths=[widths, widths_after], forward_deterministic=repeat)
    diff = float((after - before).abs().max())
    report.check(f"b growth (width {max(widths)}->{max(widths_after)})", family, diff, "torch.equal",
                 torch.equal(after, before))
    if not repeat:
        report.check("b forward deterministic", family, "no", "torch.equal", False)


def check_export(report: Report, family: str, model, state: dict, x: torch.Tensor, args) -> None:
    """c. PEFT export in bf16, loaded by vanilla PEFT onto a fresh bf16 base; PEFT's merge; drlora's merge."""
    from peft import PeftModel

    overrides = {**args.common, **args.shapes[family]}
    expected = eval_logits(model, x)
    step = bf16_step(float(expected.abs().max()))
    with tempfile.TemporaryDirectory() as folder:
        model.export_peft(folder)
        peft_model = PeftModel.from_pretrained(build_base(family, overrides, torch.bfloat16, args.device, state),
                                               folder).to(args.device)
        got = eval_logits(peft_model, x)
        merged = eval_logits(peft_model.merge_and_unload(), x)
    del peft_model
    drlora_merged = eval_logits(model.merge_and_unload(), x)
    for name, logits, ulps in (("c PEFT load", got, BOUNDS["peft_ulps"]),
                               ("c PEFT merge_and_unload", merged, BOUNDS["merged_ulps"]),
                               ("c drlora merge_and_unload", drlora_merged, BOUNDS["merged_ulps"])):
        diff = float((logits - expected).abs().max())
        report.check(f"{name} (max abs)", family, diff, f"< {ulps * step:.3g} ({ulps} bf16 steps)", diff < ulps * step)


def check_learning(report: Report, family: str, state: dict, args) -> None:
    """d. tests/test_mixed_precision.py `run()` in bf16 at lr 2e-5, at this shape: do the float32 masters move?"""
    from drlora import get_dr_lora_model

    overrides = {**args.common, **args.shapes[family]}
    model = get_dr_lora_model(build_base(family, overrides, torch.bfloat16, args.device, state),
                              lora_config(total_steps=20, growth_interval=5))
    loras, routers = model.expert_loras(), [layer.router.weight for layer in model.moe_layers]
    a0 = [lora.lora_A.detach().float().clone() for lora in loras]
    r0 = [r.detach().float().clone() for r in routers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    model.train()
    for step in range(5):
        x = tokens(200 + step, tuple(args.tokens), args.common["vocab_size"], args.device)
        model(input_ids=x, labels=x).loss.backward()
        model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad()
    active = [lora.rank_mask.unsqueeze(-1).expand_as(lora.lora_A) for lora in loras]
    moved_a = sum(int(((lora.lora_A.float() != a) & m).sum()) for lora, a, m in zip(loras, a0, active, strict=True))
    moved_a /= sum(int(m.sum()) for m in active)
    moved_b = sum(int(((lora.lora_B != 0) & lora.rank_mask.unsqueeze(1)).sum()) for lora in loras)
    moved_b /= sum(int(lora.rank_mask.sum()) * lora.out_features for lora in loras)
    moved_r = sum(int((r.float() != r_init).sum()) for r, r_init in zip(routers, r0, strict=True))
    moved_r /= sum(r.numel() for r in r0)
    report.data["details"][family].update(moved={"A": moved_a, "B": moved_b, "router": moved_r})
    for name, value in (("A", moved_a), ("router", moved_r)):
        report.check(f"d lr 2e-5: {name} entries moved", family, value, f">= {BOUNDS['moved']}",
                     value >= BOUNDS["moved"])


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_family(report: Report, family: str, args) -> None:
    """a-d for one family. An exception fails its part and the family goes on (a-c share one model, d has its own):
    on a one-shot GPU run, one failure must not cost the other numbers."""
    x = tokens(0, tuple(args.tokens), args.common["vocab_size"], args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    state = {}

    def bf16_model_checks():
        state.update(reference_state(family, {**args.common, **args.shapes[family]}, args.device))
        model = check_bf16_against_float32(report, family, state, x, args)
        free_memory(args.device)
        check_growth(report, family, model, x, args)
        check_export(report, family, model, state, x, args)

    for part, run in (("a-c", bf16_model_checks), ("d", lambda: check_learning(report, family, state, args))):
        try:
            run()
        except Exception as error:
            report.check(f"{part} raised", family, f"{type(error).__name__}: {error}"[:60], "no exception", False)
            report.data["details"].setdefault(family, {})[f"traceback {part}"] = traceback.format_exc()
            traceback.print_exc()
        free_memory(args.device)
    if args.device.startswith("cuda"):
        report.data["details"].setdefault(family, {})["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    state.clear()
    free_memory(args.device)


def run_timing(report: Report, args) -> None:
    """e. step_time's variants, interleaved, on this script's shapes registered in step_time.CONFIGS."""
    names = []
    for family in args.timing_families:
        name = f"gpu-{family}"
        step_time.CONFIGS[name] = (family, {**args.common, **args.shapes[family]}, *args.tokens)
        names.append(name)
    timing_args = SimpleNamespace(variants=list(TIMING_VARIANTS), steps=args.timed_rounds, warmup=args.warmup_rounds,
                                  rank=R_MAX, projections="up,down", lora_dropout=0.0, dtype=torch.bfloat16,
                                  device=args.device)
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            step_s, hooks = step_time.time_configs([name], timing_args)[name]
        except Exception as error:
            report.check("e timing", name, type(error).__name__, "runs", False)
            report.data["timing"][name] = {"traceback": traceback.format_exc()}
            traceback.print_exc()
            continue
        finally:
            free_memory(args.device)
        results[name] = {"step_s": step_s, "update_and_allocate": hooks, "ratios": step_time.ratios(step_s, {}),
                         "seconds": time.perf_counter() - start}
        report.data["timing"][name] = results[name]
        ratio = results[name]["ratios"]
        report.check("e timing c/a, c/d", name, f"{ratio['c/a']:.2f}, {ratio['c/d']:.2f}",
                     f"{args.warmup_rounds}+{args.timed_rounds} rounds", all(t > 0 for t in step_s.values()))
        report.write()
    if results:
        print("\nseconds per bf16 step, median of the timed rounds (a floor, b lora r32, c dr-lora r8 of 32, d peft):")
        step_time.print_table(results)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check on the CPU at tiny shapes (what CI runs, so this script cannot rot)")
    parser.add_argument("--skip-timing", action="store_true", help="skip e, the step timing")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--timing-families", default=",".join(TIMING_FAMILIES),
                        help="comma-separated families whose layer shapes are timed")
    args = parser.parse_args(argv)
    for option in ("families", "timing_families"):
        chosen = [f for f in getattr(args, option).split(",") if f]
        unknown = [f for f in chosen if f not in FAMILIES]
        if unknown or not chosen:
            parser.error(f"--{option.replace('_', '-')} names {unknown[0] if unknown else 'no family'!r}; choose "
                         f"from {', '.join(FAMILIES)}.")
        setattr(args, option, chosen)
    if args.dry_run:
        args.device, args.common, args.shapes, args.tokens = "cpu", _TINY_COMMON, TINY, (2, 16)
        args.warmup_rounds, args.timed_rounds = 1, 2
        args.timing_families = args.timing_families[:1]
    else:
        args.device, args.common, args.shapes, args.tokens = cuda_device(), _COMMON, REAL, (4, 512)
        args.warmup_rounds, args.timed_rounds = 2, 8
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.device:
        print("gpu_check: CUDA is not available here; run it on a machine with a CUDA GPU, or pass --dry-run for the "
              "same checks on the CPU at tiny shapes.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = Report(args, argv)
    print(f"gpu_check on {report.data['machine']} ({args.device}), torch {torch.__version__}; families "
          f"{', '.join(args.families)}; {args.tokens[0]} x {args.tokens[1]} tokens", flush=True)
    for family in args.families:
        family_start = time.perf_counter()
        print(f"{family}: {args.shapes[family]}", flush=True)
        run_family(report, family, args)
        report.data["seconds"][family] = time.perf_counter() - family_start
        report.write()
    if not args.skip_timing:
        timing_start = time.perf_counter()
        print(f"timing {', '.join(args.timing_families)}: {', '.join(TIMING_VARIANTS)} in bf16, "
              f"{args.warmup_rounds} + {args.timed_rounds} interleaved rounds", flush=True)
        run_timing(report, args)
        report.data["seconds"]["timing"] = time.perf_counter() - timing_start
    report.data["seconds"]["total"] = time.perf_counter() - start
    report.write()
    report.summary()
    print(f"total {report.data['seconds']['total']:.1f} s", flush=True)
    return 0 if report.data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
