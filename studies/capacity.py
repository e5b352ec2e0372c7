"""Capacity recovery: does a method put LoRA rank where the task needs it, and does that pay? A study where the
right answer is known.

A *teacher* is a base MoE plus a planted update ΔW_e of known rank p_e on every expert's adapted projections (up
and down): p_e orthonormal directions of equal strength, so an expert's demand is the number of directions it
needs. A *student* — the same base plus one method at the same active budget (E · r_target ranks per layer) — is
trained to match the teacher's next-token distribution (KL) on the same inputs. Then we know where capacity is
needed, and measure, on held-out inputs:

* divergence: KL(teacher ‖ student) / KL(teacher ‖ base) — the share of the planted change not recovered (0 is
  perfect, 1 is no better than the base);
* rank recovery: Spearman correlation of the final ranks with the planted ranks (mean over layers), and the share
  of the budget placed on the experts whose planted rank exceeds r_target.

Scenarios (one line of the table each): demand on a few experts chosen independently of routing ("independent"),
on the most routed experts ("frequent"), on the least routed ("rare": does the routing term f hurt?), and uniform
demand ("uniform": nothing to find — DR-LoRA must not lose to uniform LoRA). Methods: every `method=` of drlora,
uniform LoRA at r_max (four times the budget: a reference, not a competitor) and an *oracle* fixed allocation
∝ the planted ranks (the ceiling at equal budget).

    .venv/bin/python studies/capacity.py --out runs/capacity          # the study (docs/RESULTS.md)
    .venv/bin/python studies/capacity.py --out /tmp/c --preset smoke  # seconds: what the test runs

Writes runs.jsonl (one line per run, appended as runs finish, so an interrupted study resumes), results.json and
results.md (tables with 95 % intervals over seeds, and paired differences to uniform LoRA).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from drlora import DRLoRAConfig, get_dr_lora_model
from drlora.allocator import esft_ranks, proportional_ranks
from drlora.layout import find_moe_layers
from drlora.recipe.config import METHOD_SETTINGS, auto_growth_interval
from drlora.routing_stats import measure_routing

sys.path.insert(0, str(Path(__file__).parent))
from capacity_report import write_report  # noqa: E402

SCENARIOS = ("independent", "frequent", "rare", "uniform")
METHODS = ("dr-lora", "importance-only", "lora", "lora-rmax", "static-freq", "esft", "adalora-prune", "peft-lora",
           "oracle")
# Diagnostics: DR-LoRA with one factor changed, to find out why it wins or loses a scenario (run with --diagnose)
DIAGNOSTICS = {
    "dr-lora/fixed-final": {"allocation": "fixed"},  # dr-lora's final rank map, fixed from step 0: no schedule
    "dr-lora/even-growth": {"gamma": 50.0},  # the penalty dominates: every expert grows alike, on dr-lora's schedule
    "dr-lora/gamma-0": {"gamma": 0.0},  # no rank penalty
    "dr-lora/early-growth": {"growth_end_ratio": 0.5},  # the budget complete by mid-run, not at the end
}
FAMILIES = {  # tiny MoEs of two families; 8 experts, top-2, expert width 32
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
}


@dataclass
class StudyConfig:
    seeds: int = 5
    steps: int = 150
    batch_size: int = 16
    length: int = 32
    train_rows: int = 1024
    eval_rows: int = 256
    learning_rate: float = 3e-3
    r_init: int = 2
    r_target: int = 4
    r_max: int = 16
    high_rank: int = 12  # planted rank of a demanding expert (3 x r_target)
    low_rank: int = 1  # planted rank of every other expert
    demanding: int = 2  # demanding experts per layer
    strength: float = 0.5  # each planted direction's singular value, relative to the expert weight's largest
    router_scale: float = 3.0  # sharpens the random router so routing is skewed, as in trained MoEs
    init_std: float = 0.1  # initializer_range of the random base (0.02 leaves logits so near uniform that the
    #                        planted change moved KL by < 1e-3)
    vocab_size: int = 256
    hidden_size: int = 64
    layers: int = 2
    scenarios: tuple = SCENARIOS
    # the real-model scenario: builtin:smollm2-moe cut to its last MoE layers, on news text (demand as "independent")
    real: bool = True
    real_layers: int = 1
    real_vocab: int = 2048
    real_steps: int = 100  # a real layer costs ~100x a tiny one: fewer, smaller steps keep the study in 20 minutes
    real_batch_size: int = 8
    real_demand: str = "independent"  # which demand pattern is planted in the real model
    real_methods: tuple = ("dr-lora", "importance-only", "lora", "lora-rmax", "static-freq", "oracle")
    methods: tuple = METHODS
    families: tuple = tuple(FAMILIES)
    extra: dict = field(default_factory=dict)


PRESETS = {
    "full": {},
    "smoke": dict(seeds=2, steps=60, train_rows=128, eval_rows=64, scenarios=("independent",),
                  methods=("lora", "dr-lora", "oracle"), real=False),
}


# ---- the base, the planted teacher, the data -------------------------------------------------------------------
def build_base(family: str, study: StudyConfig, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=study.vocab_size, hidden_size=study.hidden_size,
                                  num_hidden_layers=study.layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=2 * study.length, initializer_range=study.init_std,
                                  **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in find_moe_layers(model):
            for param in layer.router.parameters():
                param.mul_(study.router_scale)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def build_real_base(study: StudyConfig):
    """builtin:smollm2-moe cut to its last `real_layers` MoE layers — real embeddings, attention, experts and k-means
    routers — and the news text (gensim's test corpus) as token rows. Its head keeps the `real_vocab` most frequent
    tokens of the text (the softmax is over those), so that the 49k-token head does not dominate a CPU step."""
    from drlora.builtin.smollm2_moe import NEWS_WHEEL, _asset
    from drlora.loading import load_model

    full, tokenizer = load_model("builtin:smollm2-moe", dtype="float32")
    keep = [int(layer.name.split(".")[2]) for layer in find_moe_layers(full)][-study.real_layers:]
    config = copy.deepcopy(full.config)
    config.num_hidden_layers, config.mlp_only_layers, config.tie_word_embeddings = len(keep), [], False
    config.use_cache = False
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    model = AutoModelForCausalLM.from_config(config)
    model.model.embed_tokens, model.model.norm = full.model.embed_tokens, full.model.norm
    model.model.layers = torch.nn.ModuleList(full.model.layers[i] for i in keep)
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    text = _asset(NEWS_WHEEL).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text).input_ids)
    rows = ids[:len(ids) // study.length * study.length].view(-1, study.length)
    frequent = torch.bincount(ids, minlength=config.vocab_size).argsort(descending=True)[:study.real_vocab]
    head = torch.nn.Linear(config.hidden_size, study.real_vocab, bias=False)
    head.weight = torch.nn.Parameter(full.model.embed_tokens.weight[frequent].detach().clone())
    model.lm_head = head
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, rows


def token_rows(study: StudyConfig, count: int, seed: int) -> torch.Tensor:
    """Sequences from a Zipf-like unigram distribution over a seeded permutation of the vocabulary (natural text's
    skew, so routing is skewed too)."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, study.vocab_size + 1, dtype=torch.float64)
    order = torch.randperm(study.vocab_size, generator=generator)
    probs = torch.empty_like(weights)
    probs[order] = weights / weights.sum()
    return torch.multinomial(probs, count * study.length, replacement=True, generator=generator).view(count, -1)


def routing_frequency(base, rows: torch.Tensor) -> dict:
    return measure_routing(base, rows.tolist(), batch_size=64)


def planted_ranks(scenario: str, study: StudyConfig, frequency: torch.Tensor, seed: int) -> torch.Tensor:
    """[layers, experts] planted rank per expert for `scenario` (`frequency`: the base's routing mass)."""
    num_layers, num_experts = frequency.shape
    if scenario == "uniform":
        return torch.full((num_layers, num_experts), study.r_target, dtype=torch.long)
    ranks = torch.full((num_layers, num_experts), study.low_rank, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed + 17)
    for layer in range(num_layers):
        if scenario == "independent":
            chosen = torch.randperm(num_experts, generator=generator)[:study.demanding]
        else:
            order = torch.argsort(frequency[layer], descending=scenario == "frequent")
            chosen = order[:study.demanding]
        ranks[layer, chosen] = study.high_rank
    return ranks


@torch.no_grad()
def plant(base, ranks: torch.Tensor, study: StudyConfig, seed: int, projections=("up", "down")):
    """The teacher: a copy of `base` with ΔW_e = σ Σ_j u_j v_jᵀ of rank ranks[l, e] added to each projection
    (orthonormal u, v; σ = strength × the expert weight's largest singular value)."""
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed + 29)
    for layer, layer_ranks in zip(find_moe_layers(teacher), ranks.tolist()):
        for proj in projections:
            geometry = layer.geometry(proj)
            deltas = torch.zeros(layer.num_experts, geometry.out_features, geometry.in_features)
            weight = _expert_weights(layer, proj)  # [E, out, in]
            for e, rank in enumerate(layer_ranks):
                if rank == 0:
                    continue
                u = torch.linalg.qr(torch.randn(geometry.out_features, rank, generator=generator))[0]
                v = torch.linalg.qr(torch.randn(geometry.in_features, rank, generator=generator))[0]
                sigma = study.strength * torch.linalg.matrix_norm(weight[e], ord=2)
                deltas[e] = sigma * u @ v.T
            layer.add_to_weight(proj, deltas)
    return teacher


def _expert_weights(layer, proj: str) -> torch.Tensor:
    weight = layer.fused_weight(proj).detach()
    columns = layer.out_slice(proj)
    return weight[:, :, columns].transpose(1, 2) if layer.is_transposed else weight[:, columns, :]


# ---- methods ---------------------------------------------------------------------------------------------------
def student(method: str, base, study: StudyConfig, seed: int, planted: torch.Tensor, routing: dict,
            earlier: dict | None = None):
    """The base (deep-copied) with `method` at the study's budget. `earlier`: final rank maps of the methods
    already run on this cell (dr-lora/fixed-final takes dr-lora's)."""
    model = copy.deepcopy(base)
    if method == "peft-lora":
        return _peft_student(model, study)
    settings = {"r_init": study.r_init, "r_target": study.r_target, "r_max": study.r_max, "lora_dropout": 0.0,
                "total_steps": study.steps, "growth_interval": auto_growth_interval(study.steps), "seed": seed}
    ranks = None
    if method in METHOD_SETTINGS:
        settings.update(METHOD_SETTINGS[method])
    if method == "lora":
        settings["r_max"] = study.r_target
    elif method == "lora-rmax":
        settings.update(allocation="fixed", r_target=study.r_max)
    elif method == "static-freq":
        ranks = proportional_ranks(routing["gate"], r_target=study.r_target, r_max=study.r_max)
    elif method == "esft":
        ranks = esft_ranks(routing["gate"], top_p=0.2, r_target=study.r_target)
        settings["r_max"] = int(ranks.max())
    elif method == "oracle":
        settings["allocation"] = "fixed"
        ranks = proportional_ranks(planted.double(), r_target=study.r_target, r_max=study.r_max)
    elif method in DIAGNOSTICS:
        settings.update(DIAGNOSTICS[method])
        if method == "dr-lora/fixed-final":
            ranks = earlier["dr-lora"]
    model = get_dr_lora_model(model, DRLoRAConfig(**settings))
    if ranks is not None:
        model.set_rank_map(ranks)
    return model


def _peft_student(model, study: StudyConfig):
    from peft import LoraConfig, get_peft_model

    from drlora.peft_export import fused_parameter_names

    names = fused_parameter_names(find_moe_layers(model), ("up", "down"))
    config = LoraConfig(r=study.r_target, lora_alpha=2 * study.r_target, lora_dropout=0.0, target_modules=[],
                        target_parameters=names, bias="none")
    return get_peft_model(model, config)


def final_ranks(model, method: str, study: StudyConfig, num_layers: int, num_experts: int) -> torch.Tensor:
    if method == "peft-lora":
        return torch.full((num_layers, num_experts), study.r_target, dtype=torch.long)
    return model.rank_map()


# ---- one run ---------------------------------------------------------------------------------------------------
def mean_kl(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher ‖ model)."""
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
    s = F.log_softmax(logits.float(), -1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@torch.no_grad()
def held_out_kl(model, teacher_logits: torch.Tensor, rows: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(rows), batch):
        x = rows[start:start + batch]
        total += float(mean_kl(teacher_logits[start:start + batch], model(x).logits)) * len(x)
    return total / len(rows)


def train(model, teacher, rows: torch.Tensor, study: StudyConfig, seed: int, drlora: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=study.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 41)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(study.steps):
        x = rows[torch.randint(0, len(rows), (study.batch_size,), generator=generator)]
        with torch.no_grad():
            target = teacher(x).logits
        loss = mean_kl(target, model(x).logits)
        loss.backward()
        if drlora:
            model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho with average ranks for ties; nan when either side is constant."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    for i, value in enumerate(x.tolist()):
        ranks[i] = float((x < value).sum()) + (float((x == value).sum()) - 1) / 2
    return ranks


REAL = ("smollm2-moe", "text")  # (family, scenario) of the real-model cells


def run_scenario(family: str, scenario: str, seed: int, study: StudyConfig, log, real=None) -> list[dict]:
    """Every method of the study on one (family, scenario, seed): the same base, teacher and data for all.
    `real`: (base, rows) of build_real_base for the real-model scenario (rows split by seed: held-out rows last)."""
    methods = study.methods
    if real is not None:
        study = dataclasses.replace(study, steps=study.real_steps, batch_size=study.real_batch_size)
        base, rows = real
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        train_rows, eval_rows = order[:-study.eval_rows], order[-study.eval_rows:]
        methods = study.real_methods
    else:
        base = build_base(family, study, seed)
        train_rows = token_rows(study, study.train_rows, seed)
        eval_rows = token_rows(study, study.eval_rows, seed + 1_000)
    routing = routing_frequency(base, train_rows[:256])
    planted = planted_ranks(study.real_demand if real is not None else scenario, study, routing["gate"], seed)
    teacher = plant(base, planted, study, seed)
    with torch.no_grad():
        teacher_eval = torch.cat([teacher(eval_rows[i:i + 64]).logits for i in range(0, len(eval_rows), 64)])
    base_kl = held_out_kl(base, teacher_eval, eval_rows)
    results = []
    for method in methods:
        clock = time.time()
        model = student(method, base, study, seed, planted, routing, {r["method"]: torch.tensor(r["ranks"])
                                                                        for r in results})
        last_loss = train(model, teacher, train_rows, study, seed, drlora=method != "peft-lora")
        kl = held_out_kl(model, teacher_eval, eval_rows)
        ranks = final_ranks(model, method, study, *planted.shape)
        demanding = planted > study.r_target
        budget_share = float((ranks * demanding).sum() / ranks.sum()) if demanding.any() else math.nan
        rho = [spearman(r, p) for r, p in zip(ranks, planted)]
        results.append({"family": family, "scenario": scenario, "seed": seed, "method": method,
                        "divergence": kl / base_kl, "kl": kl, "base_kl": base_kl, "last_train_kl": last_loss,
                        "spearman": sum(rho) / len(rho), "budget_share": budget_share,
                        "active_ranks": int(ranks.sum()), "ranks": ranks.tolist(), "planted": planted.tolist(),
                        "routing": routing["gate"].tolist(), "seconds": round(time.time() - clock, 2)})
        log(f"  {family} {scenario} seed {seed} {method:<15} divergence {kl / base_kl:.3f}  "
            f"spearman {results[-1]['spearman']:+.2f}  ({time.time() - clock:.1f}s)")
    return results


def run_study(study: StudyConfig, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    done = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    (out / "study.json").write_text(json.dumps(asdict(study), indent=2))
    # seed s runs on family s mod len(families): several families, and every scenario sees each of them
    cells = [(study.families[seed % len(study.families)], scenario, seed) for scenario in study.scenarios
             for seed in range(study.seeds)]
    finished = {(r["family"], r["scenario"], r["seed"]) for r in done}
    cells += [(*REAL, seed) for seed in range(study.seeds)] if study.real else []
    clock, real = time.time(), None
    for i, (family, scenario, seed) in enumerate(cells):
        if (family, scenario, seed) in finished:
            continue
        log(f"drlora capacity study: {i + 1}/{len(cells)} — {family}, {scenario}, seed {seed} "
            f"({time.time() - clock:.0f}s so far)")
        if (family, scenario) == REAL and real is None:
            real = build_real_base(study)
        rows = run_scenario(family, scenario, seed, study, log, real if (family, scenario) == REAL else None)
        with runs_file.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        done += rows
    return write_report(done, study, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for runs.jsonl, results.json, results.md")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--diagnose", action="store_true",
                        help="run dr-lora and its diagnostic variants (DIAGNOSTICS) with lora and the oracle instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    study = StudyConfig(**PRESETS[args.preset])
    if args.diagnose:
        study.methods, study.real = ("lora", "dr-lora", *DIAGNOSTICS, "importance-only", "oracle"), False
    for key in ("seeds", "steps"):
        if getattr(args, key) is not None:
            setattr(study, key, getattr(args, key))
    started = time.time()
    run_study(study, args.out)
    print(f"drlora capacity study: wrote {args.out}/results.md ({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
