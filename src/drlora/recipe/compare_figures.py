"""compare's figures: scores per method and task with error bars, and DR-LoRA's final rank maps side by side.

Each is drawn on a private Agg canvas (no pyplot state) and written atomically, so a killed compare never leaves
half a PNG.
"""

from __future__ import annotations

import statistics

import matplotlib
import numpy as np

from ..fileio import atomic_write
from .report import layer_labels, read_metrics


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure(figsize=size, layout="constrained")).figure


def draw_results(agg: dict, path) -> None:
    """Grouped bars: score after training per method (bars) and task (groups), error bars = sample std over seeds,
    the base model's score as a dashed line over its group. `agg` is compare's aggregate of results.csv."""
    methods, groups = agg["methods"], agg["tasks"] + (["average"] if len(agg["tasks"]) > 1 else [])
    width, colours = 0.8 / len(methods), matplotlib.colormaps["tab20" if len(methods) > 10 else "tab10"]
    ax = (fig := _figure((max(5.0, 1.2 + len(groups) * (0.5 + 0.35 * len(methods))), 4.2))).subplots()
    for i, m in enumerate(methods):
        values = [list(agg["scores"][(m, g)].values()) for g in groups]
        ax.bar(np.arange(len(groups)) - 0.4 + width * (i + 0.5), [np.mean(v) if v else np.nan for v in values],
               width * 0.9, yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values], capsize=3, label=m,
               color=colours(i % colours.N))
    for g, task in ((g, t) for g, t in enumerate(agg["tasks"]) if agg["before"][t]):
        ax.hlines(statistics.fmean(agg["before"][task]), g - 0.45, g + 0.45, colors="black", linestyles="--",
                  label="base model" if g == 0 else None)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylim=(0, 100), ylabel="score after training (%)", title="mean over seeds; error bars: sample std")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def draw_rank_heatmaps(rows: list[dict], path) -> None:
    """Final rank maps side by side (columns: tasks; rows: dr-lora method labels) on one colour scale, so a reader
    sees whether different tasks grow different experts."""
    from matplotlib.colors import Normalize

    labels, tasks = list(dict.fromkeys(r["method"] for r in rows)), list(dict.fromkeys(r["task"] for r in rows))
    maps = {(r["method"], r["task"]): read_metrics(r["run_dir"]) for r in rows}
    norm = Normalize(min(m["r_init"] for m in maps.values()), max(m["r_max"] for m in maps.values()))
    layers, experts = np.asarray(next(iter(maps.values()))["rank_map"]).shape
    fig = _figure((max(3.0, 0.35 * experts + 1.2) * len(tasks) + 1.0, max(2.5, 0.3 * layers + 1.0) * len(labels)))
    axes, image = np.asarray(fig.subplots(len(labels), len(tasks), squeeze=False)), None
    for (i, label), (j, task) in ((a, b) for a in enumerate(labels) for b in enumerate(tasks)):
        ax, metrics = axes[i, j], maps.get((label, task))
        if metrics is None:  # that task's first-seed run has not finished yet
            ax.axis("off")
            continue
        ranks = np.asarray(metrics["rank_map"], dtype=float)
        image = ax.imshow(ranks, cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(ranks)), layer_labels(metrics), fontsize=8)
        ax.set(xlabel="expert", title=task if len(labels) == 1 else f"{label}: {task}")
        for (y, x), rank in np.ndenumerate(ranks) if max(ranks.shape) <= 16 else ():  # beyond, the digits blur
            ax.text(x, y, f"{rank:.0f}", ha="center", va="center", fontsize=7, color="k" if norm(rank) >= 0.55 else "w")
    fig.colorbar(image, ax=axes, label="LoRA rank", shrink=0.9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
