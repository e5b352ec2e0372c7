"""What a finished `drlora train` run did, read back from its run folder: a rank heatmap and a plain-text summary.

DR-LoRA's point is *where* the ranks went, so the report is built around the final rank map (metrics.json) and
its history (ranks.jsonl): which experts grew, how fast each layer reached r_target, and what the eval scores did.
It only reads the run folder, so it works on a laptop for a run trained elsewhere; the figure is drawn on a private
Agg canvas (no pyplot, no display, no global state) and written atomically, so a run folder never holds half a PNG.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import yaml

from ..fileio import atomic_write

METRICS, CONFIG, RANKS, HEATMAP = "metrics.json", "config.yaml", "ranks.jsonl", "rank_heatmap.png"
ANNOTATE_MAX = 32  # cells carry their rank as text only up to this many experts and layers: beyond, digits blur
MOST_TICKS = 24  # at most this many tick labels per axis, so 64-128 experts or 48 layers stay legible
LEGEND_MAX = 8  # one legend entry per layer up to here; beyond, a colour bar maps line colour to layer depth


# ---- reading the run folder -----------------------------------------------------------------------------------------
def _parse_json(text: str, path: Path, line: int = 1):
    """json.loads, with the file and line in the error: a hand-edited or truncated file must be findable."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {line + err.lineno - 1}: not valid JSON ({err.msg}); "
                         "fix or remove that line, or re-run the training.") from None


def read_metrics(run_dir) -> dict:
    """metrics.json, checked for the keys the report cannot do without (the final rank map and the rank bounds)."""
    path = Path(run_dir) / METRICS
    metrics = _parse_json(path.read_text(encoding="utf-8"), path)
    missing = [k for k in ("rank_map", "r_init", "r_max") if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}; it was not written by a finished `drlora train` run.")
    return metrics


def read_events(run_dir) -> list[dict]:
    """ranks.jsonl as a list of growth events in step order; none when the file is missing or empty (no growth)."""
    path = Path(run_dir) / RANKS
    if not path.is_file():
        return []
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        event = _parse_json(line, path, number)
        if not isinstance(event, dict) or "step" not in event or "ranks" not in event:
            raise ValueError(f"{path}: line {number}: a growth event needs 'step' and 'ranks'; fix or remove the line.")
        events.append(event)
    return sorted(events, key=lambda e: e["step"])


def read_config(run_dir) -> dict:
    """config.yaml (safe_load only: a run folder may come from anywhere); {} when absent."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: {where}not valid YAML; fix the file or re-run the training.") from None


def layer_labels(metrics: dict) -> list[str]:
    """'L20' for 'model.layers.20.mlp.experts' (the layer number is what a reader knows); '#i' when there is none."""
    count = len(metrics["rank_map"])
    names = metrics.get("layer_names") or []
    labels = []
    for i in range(count):
        found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", names[i]) if i < len(names) and names[i] else None
        labels.append(f"L{found.group(1)}" if found else f"#{i}")
    return labels


def _thinned(count: int) -> list[int]:
    return list(range(0, count, max(1, math.ceil(count / MOST_TICKS))))


# ---- the figure ---------------------------------------------------------------------------------------------------
def heatmap_figure(run_dir):
    """The two-panel figure (final rank map; ranks over steps) as a matplotlib Figure on Agg."""
    try:  # imported here: training and `summary` must not need matplotlib
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the rank heatmap needs matplotlib; pip install matplotlib, then run the report "
                          "again.") from None

    metrics, events = read_metrics(run_dir), read_events(run_dir)
    ranks = np.asarray(metrics["rank_map"], dtype=float)
    n_layers, n_experts = ranks.shape
    r_init, r_max, r_target = metrics["r_init"], metrics["r_max"], metrics.get("r_target")
    labels = layer_labels(metrics)
    annotate = n_experts <= ANNOTATE_MAX and n_layers <= ANNOTATE_MAX

    left = float(np.clip((0.42 if annotate else 0.15) * n_experts, 4.5, 13))
    height = float(np.clip(0.3 * n_layers, 3.2, 11)) + 1.4
    fig = Figure(figsize=(left + 7.5, height), layout="constrained")
    FigureCanvasAgg(fig)
    heat, growth = fig.subplots(1, 2, width_ratios=[left, 6])

    low = min(r_init, int(ranks.min()))  # pruning and the static baselines go below the starting rank
    norm = Normalize(low, r_max if r_max > low else low + 1)
    image = heat.imshow(ranks, cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=heat, label="LoRA rank", shrink=0.9)
    rows, cols = _thinned(n_layers), _thinned(n_experts)
    heat.set_yticks(rows, [labels[i] for i in rows])
    heat.set_xticks(cols, [str(e) for e in cols], fontsize=8 if n_experts > 32 else 10)
    heat.set_xlabel("expert")
    heat.set_ylabel("MoE layer")
    if annotate:
        size = 10 if n_experts <= 8 else 8 if n_experts <= 16 else 6
        for (layer, expert), rank in np.ndenumerate(ranks):
            dark = norm(rank) < 0.55  # viridis is dark at the low end: white digits there, black on yellow
            heat.text(expert, layer, f"{rank:.0f}", ha="center", va="center", fontsize=size,
                      color="white" if dark else "black")
    target = f", target {r_target}" if r_target is not None else ""
    heat.set_title(f"{metrics.get('method', 'run')}: final ranks (mean {ranks.mean():.2f}{target})")

    # Every layer reaches the same budget on the same schedule, so each layer's mean rank is the same curve; what
    # differs is how unevenly a layer spreads its ranks. Shown: the mean, the band between the least- and the
    # most-grown expert of the whole model, and each layer's most-grown expert.
    steps = int(metrics.get("steps") or (events[-1]["step"] if events else 0))
    xs = [0] + [e["step"] for e in events] + [max(steps, events[-1]["step"] if events else 0)]
    # no events: flat lines at what the layers hold, rather than a jump from r_init that never happened
    history = [np.full_like(ranks, float(r_init)) if events else ranks]
    history += [np.asarray(e["ranks"], dtype=float) for e in events] + [ranks]
    history = np.stack([h if h.shape == ranks.shape else np.full_like(ranks, np.nan) for h in history])
    growth.fill_between(xs, np.nanmin(history, axis=(1, 2)), np.nanmax(history, axis=(1, 2)), step="post",
                        color="lightgray", label="least- to most-grown expert")
    line_map = colormaps["plasma"]
    for layer in range(n_layers):
        colour = line_map(0.85 * layer / max(n_layers - 1, 1))
        growth.plot(xs, history[:, layer].max(axis=1), drawstyle="steps-post", color=colour, lw=1.2,
                    label=f"{labels[layer]} max")
    growth.plot(xs, history.mean(axis=(1, 2)), drawstyle="steps-post", color="black", lw=2, label="mean")
    if r_target is not None:
        growth.axhline(r_target, color="black", ls="--", lw=1, label=f"r_target = {r_target}")
    if n_layers <= LEGEND_MAX:
        growth.legend(fontsize=8, loc="upper left")
    else:
        bar = fig.colorbar(ScalarMappable(Normalize(0, n_layers - 1), line_map.resampled(256)), ax=growth,
                           shrink=0.9, label="MoE layer of the max line")
        bar.set_ticks(_thinned(n_layers), labels=[labels[i] for i in _thinned(n_layers)], fontsize=7)
        growth.text(0.98, 0.02, "black: mean rank; lines: each layer's most-grown expert;\ngrey: least- to "
                    "most-grown expert", transform=growth.transAxes, ha="right", va="bottom", fontsize=8)
    if not events:
        growth.text(0.5, 0.5, "no growth events", transform=growth.transAxes, ha="center", va="center",
                    fontsize=12, color="dimgray")
    growth.set_ylim(min(r_init, np.nanmin(history)) - 0.5, r_max + 0.5)
    growth.set_xlabel("step")
    growth.set_ylabel("active rank")
    growth.set_title(f"growth over time ({len(events)} event{'s' if len(events) != 1 else ''})")
    fig.suptitle(str(metrics.get("model", "")), fontsize=10)
    return fig


def draw_heatmap(run_dir, path=None) -> Path:
    """Write the rank heatmap PNG (default run_dir/rank_heatmap.png) atomically and return its path."""
    path = Path(path) if path is not None else Path(run_dir) / HEATMAP
    fig = heatmap_figure(run_dir)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


# ---- the text summary ---------------------------------------------------------------------------------------------
def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _eval_table(before: dict | None, after: dict | None) -> list[str]:
    """One row per (task, metric): before -> after and the signed change; '-' where a side was not evaluated."""
    before, after = before or {}, after or {}
    tasks = list(after) + [t for t in before if t not in after]
    if not tasks:
        return ["eval: none (no eval set in this run)"]
    lines = [f"{'eval task':<18}{'metric':<13}{'before':>8}   {'after':>7}{'change':>9}{'n':>7}"]
    for task in tasks:
        b, a = before.get(task) or {}, after.get(task) or {}
        numeric = [m for m in {**b, **a} if m != "n" and any(isinstance(s.get(m), (int, float)) for s in (a, b))]
        for metric in numeric:
            old, new = b.get(metric), a.get(metric)
            change = f"{new - old:+.3f}" if isinstance(old, (int, float)) and isinstance(new, (int, float)) else ""
            name = Path(task).name if "/" in task else task
            lines.append(f"{name[:17]:<18}{metric:<13}{_number(old, '.3f'):>8} → {_number(new, '.3f'):>7}"
                         f"{change:>9}{a.get('n', b.get('n', '')):>7}")
    return lines


def summary(run_dir) -> str:
    """A compact plain-text account of the run: speed, eval before -> after, parameters, and where the ranks went."""
    metrics, events, config = read_metrics(run_dir), read_events(run_dir), read_config(run_dir)
    ranks = np.asarray(metrics["rank_map"], dtype=int)
    r_init, r_max, r_target = metrics["r_init"], metrics["r_max"], metrics.get("r_target")
    loss = metrics.get("train_loss") or {}
    params = metrics.get("parameters") or {}
    model, method = metrics.get("model", config.get("model", "?")), metrics.get("method", config.get("method", "?"))
    lines = [f"drlora run {Path(run_dir)}",
             f"model {model}   method {method}   status {metrics.get('status', '?')}",
             f"steps {metrics.get('steps', '?')}   wall time {_duration(metrics.get('wall_time_s'))}   "
             f"{_number(metrics.get('train_tokens_per_s'), ',.1f')} tokens/s   "
             f"{_number(metrics.get('tokens_seen'), ',')} tokens seen"]
    if loss:
        lines.append(f"train loss {_number(loss.get('first'), '.4f')} → {_number(loss.get('last'), '.4f')} "
                     f"(min {_number(loss.get('min'), '.4f')})")
    lines += [""] + _eval_table(metrics.get("eval_before"), metrics.get("eval_after")) + [""]
    lines.append("parameters: " + " / ".join(f"{k} {_number(params.get(k), ',')}"
                                             for k in ("active", "reserved", "trainable"))
                 + (f" (model total {params['total']:,})" if isinstance(params.get("total"), int) else ""))
    target = f", r_target {r_target}" if r_target is not None else ""
    lines.append(f"ranks: min {ranks.min()} / mean {ranks.mean():.2f} / max {ranks.max()} "
                 f"(r_init {r_init}{target}, r_max {r_max}); {int((ranks >= r_max).sum())} of {ranks.size} experts "
                 f"at r_max, {int((ranks <= r_init).sum())} still at r_init")
    lines.append("where the ranks went (top 3 experts per layer):")
    for label, row in zip(layer_labels(metrics), ranks):
        top = np.argsort(-row, kind="stable")[:3]  # ties: the lower expert index first, so the text is reproducible
        lines.append(f"  {label}: " + " ".join(f"e{e}={row[e]}" for e in top))
    last = (f" (last at step {events[-1]['step']}, {events[-1].get('layers_below_target', '?')} layer(s) "
            "below target then)") if events else ""
    lines.append(f"growth events: {len(events)}{last}")
    return "\n".join(lines)


def report(run_dir) -> str:
    """Check that run_dir is a drlora run folder, redraw its heatmap, and return the summary naming the PNG."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; pass the output_dir of a `drlora train` run.")
    missing = [name for name in (METRICS, CONFIG) if not (run_dir / name).is_file()]
    if missing == [METRICS]:
        raise FileNotFoundError(f"{run_dir} has no {METRICS}, so its training has not finished; pass the "
                                "output_dir of a finished `drlora train` run (or resume this one).")
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a drlora run folder (it has no {' or '.join(missing)}); pass "
                                "the output_dir of a finished `drlora train` run.")
    read_config(run_dir)  # malformed YAML is reported here, before any drawing
    path = draw_heatmap(run_dir)
    return summary(run_dir) + f"\nheatmap: {path}"
