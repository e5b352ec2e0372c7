"""Tables of the capacity study (studies/capacity.py): means with 95 % intervals over the seeds of a scenario,
and each method's paired difference to uniform LoRA (same base, teacher and data)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

# two-sided 95 % quantiles of Student's t by degrees of freedom (the normal's beyond the table)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 24: 2.064, 30: 2.042, 40: 2.021, 60: 2.000}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    larger = [d for d in _T975 if d > df]
    return _T975[min(larger)] if larger else 1.96


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval half-width of the finite values ({"n": 0} when none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "half_width": math.nan}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "half_width": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "half_width": t975(n - 1) * sd / math.sqrt(n)}


def _fmt(stat: dict, digits: int = 3, signed: bool = False) -> str:
    if stat["n"] == 0 or not math.isfinite(stat["mean"]):
        return "—"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return mean if not math.isfinite(stat["half_width"]) else f"{mean} ± {stat['half_width']:.{digits}f}"


def summarise(runs: list[dict], reference: str = "lora") -> dict:
    """{scenario: {method: {divergence, paired_vs_reference, spearman, budget_share}}} over seeds."""
    table: dict = {}
    by_unit = {(r["scenario"], r["family"], r["seed"], r["method"]): r for r in runs}
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        rows = [r for r in runs if r["scenario"] == scenario]
        table[scenario] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            paired = [r["divergence"] - by_unit[(scenario, r["family"], r["seed"], reference)]["divergence"]
                      for r in mine if (scenario, r["family"], r["seed"], reference) in by_unit]
            table[scenario][method] = {
                "divergence": interval([r["divergence"] for r in mine]),
                "paired_vs_reference": interval(paired) if method != reference else None,
                "spearman": interval([r["spearman"] for r in mine]),
                "budget_share": interval([r["budget_share"] for r in mine]),
                "active_ranks": sorted({r["active_ranks"] for r in mine}),
            }
    return table


def markdown(table: dict, study, reference: str = "lora") -> str:
    lines = ["# Capacity-recovery study\n",
             f"{study.seeds} seeds per scenario (seed s on family s mod {len(study.families)}: "
             f"{', '.join(study.families)}); "
             f"{study.steps} steps; budget r_target {study.r_target} per expert (r_init {study.r_init}, r_max "
             f"{study.r_max}); planted rank {study.high_rank} on {study.demanding} experts per layer and "
             f"{study.low_rank} elsewhere (uniform: {study.r_target} everywhere). Mean ± 95 % t-interval over "
             f"seeds. divergence = held-out KL(teacher‖student) / KL(teacher‖base), lower is better; "
             f"Δ vs {reference} is paired (same base, teacher and data), negative = better than uniform LoRA; "
             f"ρ = Spearman(final ranks, planted ranks); budget share = share of the active ranks on experts "
             f"whose planted rank exceeds r_target (the oracle's is the most a method can place there).\n"]
    for scenario, methods in table.items():
        lines += [f"\n## {scenario}\n", f"| method | divergence | Δ vs {reference} | ρ | budget share | ranks |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, s in methods.items():
            paired = "(reference)" if s["paired_vs_reference"] is None else _fmt(s["paired_vs_reference"],
                                                                                 signed=True)
            ranks = "/".join(map(str, s["active_ranks"]))
            lines.append(f"| {method} | {_fmt(s['divergence'])} | {paired} | {_fmt(s['spearman'], 2, True)} | "
                         f"{_fmt(s['budget_share'], 2)} | {ranks} |")
    return "\n".join(lines) + "\n"


def draw(table: dict, path: Path, reference: str = "lora") -> None:
    """Per scenario: divergence, and the paired difference to uniform LoRA, per method; 95 % intervals as error
    bars (the budget shares are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(table)
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(11, 2.4 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        methods = list(table[scenario])
        panels = (("divergence", "KL / base KL (lower is better)"),
                  ("paired_vs_reference", f"Δ divergence vs {reference}, paired (< 0: better)"))
        for col, (key, title) in enumerate(panels):
            stats = [table[scenario][m][key] or {"n": 1, "mean": 0.0, "half_width": math.nan} for m in methods]
            means = [st["mean"] if st["n"] else math.nan for st in stats]
            errors = [st["half_width"] if st["n"] > 1 and math.isfinite(st["half_width"]) else 0 for st in stats]
            ax = axes[row][col]
            ax.barh(range(len(methods)), means, xerr=errors, color="#4c72b0", alpha=0.8)
            ax.set_yticks(range(len(methods)), methods, fontsize=8)
            ax.invert_yaxis()
            if col == 1:
                ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(f"{scenario}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], study, out: Path) -> dict:
    table = summarise(runs)
    (out / "results.json").write_text(json.dumps({"study": asdict(study), "table": table}, indent=2))
    (out / "results.md").write_text(markdown(table, study))
    draw(table, out / "results.png")
    return table
