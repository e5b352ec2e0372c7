"""Item-by-item comparisons of compare's runs: paired bootstrap intervals and the smallest detectable difference.

Two methods trained on the same task and seed are scored on the same eval items, and their accuracies differ by the
items one gets right and the other does not. Comparing the two means with their own spreads throws that pairing
away; comparing item by item keeps it, and on a few hundred items it is what makes a 1–2 point difference visible.

The interval is a two-way bootstrap over items and seeds: each replicate draws the task's items with replacement
(the test-set noise: another sample of the task) and the seeds' effects with replacement (the training noise: another
seed is another run), counting the item × seed noise once (`_replicates` says how and why). Pooled over tasks,
every task weighs the same. The smallest difference the study can detect is reported as
2.8 × the bootstrap standard error: the true difference at which a two-sided 5 % test has 80 % power
(1.96 + 0.84 standard errors), under the usual normal approximation.

A run's per-item records are its eval_items.jsonl (written by `drlora train`); runs whose items do not match (another
eval set) are never paired, and runs without the file (older drlora) are left out of these tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPLICATES = 4000
BOOTSTRAP_SEED = 0  # fixed, so results.md is the same every time it is written from the same runs
DETECTABLE_FACTOR = 2.8  # (z_0.975 + z_0.80): the true difference a 5 % two-sided test finds 80 % of the time


def read_items(run_dir) -> dict[str, list[dict]] | None:
    """{"before": records, "after": records} of a run (each in item order), or None when the run has no
    eval_items.jsonl. A compare run scores one eval set, so records are not told apart by set here."""
    path = Path(run_dir) / "eval_items.jsonl"
    if not path.is_file():
        return None
    found: dict[str, list[dict]] = {"before": [], "after": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            found.setdefault(record["when"], []).append(record)
    return {when: sorted(records, key=lambda r: r["index"]) for when, records in found.items()}


def _matrix(records_by_seed: dict[int, list[dict]], seeds: list[int]) -> tuple[np.ndarray, tuple] | None:
    """Correctness as [seeds, items] and the items' keys, or None if the seeds' eval items differ."""
    keys = tuple(r["key"] for r in records_by_seed[seeds[0]])
    if any(tuple(r["key"] for r in records_by_seed[s]) != keys for s in seeds):
        return None
    return np.array([[r["correct"] for r in records_by_seed[s]] for s in seeds], dtype=float), keys


def bootstrap(differences: dict[str, np.ndarray], replicates: int = REPLICATES,
              seed: int = BOOTSTRAP_SEED) -> dict[str, dict]:
    """Per task (arrays [seeds, items] of per-item differences) and "pooled" (every task weighs the same): the mean
    difference, its 95 % percentile interval (lo, hi), the bootstrap standard error and the detectable difference,
    in the arrays' units. See `_replicates` for how one task is resampled."""
    rng = np.random.default_rng(seed)
    draws, result = {}, {}
    for task, diff in differences.items():
        draws[task] = _replicates(diff, replicates, rng)
        result[task] = _summary(diff.mean(), draws[task])
    if len(differences) > 1:
        result["pooled"] = _summary(np.mean([d.mean() for d in differences.values()]),
                                    np.mean(list(draws.values()), axis=0))
    return result


def _replicates(diff: np.ndarray, replicates: int, rng) -> np.ndarray:
    """Bootstrap replicates of the mean of `diff` [seeds, items]: the items drawn with replacement (on the
    seed-averaged differences), plus the seeds' own effects drawn with replacement.

    Why not simply draw seeds and items crossed: the seeds' means also carry the item × seed noise that the item
    draw already carries, so a crossed draw counts it twice and errs wide (its standard error 1.57 × the real spread on simulated studies
    of 5 seeds × 300 items). Drawing items alone ignores that another seed is another run and errs narrow (0.71 × with
    a seed effect of 4 points). Here each seed's effect is its mean minus the grand mean, shrunk so its variance is
    the seeds' variance less the part the item × seed residual explains (a two-way random-effects decomposition),
    and scaled by sqrt(S / (S − 1)) because resampling S values shrinks their variance by (S − 1) / S.
    tests/test_compare_paired.py checks the standard error against the real spread on such simulated studies
    (1.08 × and 0.97 ×)."""
    n_seeds, n_items = diff.shape
    per_item, per_seed = diff.mean(0), diff.mean(1)
    item_weights = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=replicates)
    draws = item_weights @ per_item / n_items
    if n_seeds > 1:
        residual = diff - per_seed[:, None] - per_item[None, :] + diff.mean()
        residual_var = (residual ** 2).sum() / ((n_seeds - 1) * (n_items - 1))
        seed_var = per_seed.var(ddof=1)
        shrink = np.sqrt(max(0.0, 1 - residual_var / (n_items * seed_var))) if seed_var > 0 else 0.0
        effects = (per_seed - per_seed.mean()) * shrink * np.sqrt(n_seeds / (n_seeds - 1))
        seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=replicates)
        draws = draws + seed_weights @ effects / n_seeds
    return draws


def _summary(mean: float, draws: np.ndarray) -> dict:
    se = float(draws.std(ddof=1))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "se": se, "detectable": DETECTABLE_FACTOR * se}


def _collect(rows: list[dict]) -> dict:
    """(method, task) -> {seed: records} after training and before it (the base model, as that run scored it), for
    finished runs with items."""
    after, before = {}, {}
    for row in rows:
        items = read_items(row["run_dir"]) if row.get("run_dir") else None
        if not items or not items.get("after"):
            continue
        after.setdefault((row["method"], row["task"]), {})[row["seed"]] = items["after"]
        if items.get("before"):
            before.setdefault((row["method"], row["task"]), {})[row["seed"]] = items["before"]
    return {"after": after, "before": before}


def paired_differences(collected: dict, method: str, reference: str | None, task: str,
                       seeds: list[int] | None = None) -> np.ndarray | None:
    """100 × (method − reference) correctness on `task` as [seeds, items], over `seeds` (default: every seed both
    have); reference None means the base model (the runs' own scores before training). None when nothing pairs or
    the eval items differ."""
    mine = collected["after"].get((method, task), {})
    theirs = collected["before" if reference is None else "after"].get((reference or method, task), {})
    common = sorted(set(mine) & set(theirs)) if seeds is None else seeds
    if not common or not all(s in mine and s in theirs for s in common):
        return None
    a, b = _matrix(mine, common), _matrix(theirs, common)
    if a is None or b is None or a[1] != b[1]:
        return None  # not the same eval items: never paired
    return 100 * (a[0] - b[0])


def compare_methods(collected: dict, method: str, reference: str | None, tasks: list[str]) -> dict[str, dict]:
    """Bootstrap summaries (see `bootstrap`) per task that pairs, plus "pooled" over every task when all of them
    pair on at least one common seed; each with "seeds", how many seeds it rests on."""
    found = {}
    for task in tasks:
        diff = paired_differences(collected, method, reference, task)
        if diff is not None:
            found[task] = {**bootstrap({task: diff})[task], "seeds": diff.shape[0]}
    if len(tasks) > 1 and len(found) == len(tasks):
        mine = [set(collected["after"].get((method, t), {})) for t in tasks]
        theirs = [set(collected["before" if reference is None else "after"].get((reference or method, t), {}))
                  for t in tasks]
        seeds = sorted(set.intersection(*mine, *theirs))
        differences = {t: paired_differences(collected, method, reference, t, seeds) for t in tasks} if seeds else {}
        if seeds and all(d is not None for d in differences.values()):
            found["pooled"] = {**bootstrap(differences)["pooled"], "seeds": len(seeds)}
    return found


def _interval(s: dict) -> str:
    return f"{s['mean']:+.1f} [{s['lo']:+.1f}, {s['hi']:+.1f}]"


def paired_item_lines(rows: list[dict], methods: list[str], tasks: list[str]) -> list[str]:
    """results.md's item-paired sections: the first method against each other (first − method, the sign of the
    run-paired table above them), and every method's gain over the base model; empty when no run has per-item
    records."""
    collected = _collect(rows)
    if not collected["after"]:
        return []
    columns = tasks + (["pooled"] if len(tasks) > 1 else [])
    header = "| method | " + " | ".join(columns) + " | seeds | detectable |"
    rule = "|---|" + "---:|" * len(columns) + "---:|---:|"
    first, lines = methods[0], []
    against = {m: compare_methods(collected, first, m, tasks) for m in methods[1:]}
    if against:
        detectable = [found[columns[-1]]["detectable"] for found in against.values() if columns[-1] in found]
        size = f"about {np.median(detectable):.1f} points" if detectable else "not known until every task has a run"
        lines += ["", f"## {first} − each method, paired item by item", "",
                  (f"Difference in accuracy, percentage points ({first} − method; > 0: {first} scored higher), mean "
                   "over the seeds both finished and the task's eval items, with a 95 % two-way bootstrap interval "
                   "(seeds and items resampled; pooled: every task weighs the same). seeds and detectable refer to "
                   f"the last column; detectable = the true difference a two-sided 5 % test finds with 80 % power "
                   f"(2.8 bootstrap standard errors). The smallest difference this study can detect ({columns[-1]}, "
                   f"median over methods): {size}."
                   + (" Where seeds is 1, the interval covers the test items' noise only, not another run's."
                      if any(f.get(columns[-1], {}).get("seeds") == 1 for f in against.values()) else "")),
                  "", header, rule,
                  *(_row_line(m, found, columns) for m, found in against.items())]
    if collected["before"]:
        gains = {m: compare_methods(collected, m, None, tasks) for m in methods}
        lines += ["", "## Gain over the base model, paired item by item", "",
                  ("Accuracy after training − the base model's on the same items, percentage points, with 95 % "
                   "intervals as above."), "", header, rule,
                  *(_row_line(m, found, columns) for m, found in gains.items())]
    return lines


def _row_line(method: str, found: dict, columns: list[str]) -> str:
    cells = " | ".join(_interval(found[c]) if c in found else "–" for c in columns)
    last = found.get(columns[-1])
    tail = f"{last['seeds']} | {last['detectable']:.1f}" if last else "– | –"
    return f"| {method} | {cells} | {tail} |"
