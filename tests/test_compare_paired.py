"""compare's item-paired comparisons: the bootstrap's standard error is the real spread of the estimate (with and
without a seed effect), the tables pair only runs scored on the same items, and their numbers are the runs' own."""

import json

import numpy as np
import pytest

from drlora.recipe.compare_paired import bootstrap, paired_item_lines


def simulated_study(rng, seeds: int, items: int, seed_effect: float) -> np.ndarray:
    """Per-item differences (method − reference, percentage points) of a study whose true difference is 0: items of
    varied difficulty, each seed's run shifted by its own effect (another seed is another run)."""
    difficulty = rng.uniform(0.2, 0.9, items)
    shift = rng.normal(0, seed_effect, seeds)
    reference = rng.random((seeds, items)) < difficulty
    method = rng.random((seeds, items)) < np.clip(difficulty[None] + shift[:, None], 0, 1)
    return 100 * (method.astype(float) - reference)


@pytest.mark.parametrize("seed_effect", [0.0, 0.04])
def test_the_bootstrap_standard_error_is_the_spread_of_the_estimate_over_repeated_studies(seed_effect):
    """150 simulated studies of 5 seeds × 300 items: the bootstrap standard error must match the actual spread of
    the study's mean difference (within 15 %/20 %; the spread itself is known to about 6 %). A plain crossed
    bootstrap of seeds and items counts the item × seed noise twice (ratio 1.57 without a seed effect); an
    items-only bootstrap misses the seed effect (ratio 0.71 with one): each fails one of the two cases."""
    rng = np.random.default_rng(1)
    means, errors = [], []
    for k in range(150):
        found = bootstrap({"t": simulated_study(rng, seeds=5, items=300, seed_effect=seed_effect)},
                          replicates=400, seed=k)["t"]
        means.append(found["mean"])
        errors.append(found["se"])
    assert 0.85 <= np.mean(errors) / np.std(means) <= 1.2


def test_bootstrap_of_one_seed_matches_the_standard_error_of_a_mean():
    rng = np.random.default_rng(0)
    diff = 100 * (rng.random((1, 400)) < 0.3) - 100 * (rng.random((1, 400)) < 0.2)
    found = bootstrap({"t": diff})["t"]
    expected = diff.std(ddof=1) / np.sqrt(diff.shape[1])
    assert found["mean"] == pytest.approx(diff.mean()) and found["lo"] < found["mean"] < found["hi"]
    assert found["se"] == pytest.approx(expected, rel=0.1)
    assert found["detectable"] == pytest.approx(2.8 * found["se"])
    assert bootstrap({"t": diff}) == bootstrap({"t": diff})  # a fixed stream: results.md is reproducible
    zero = bootstrap({"a": np.zeros((3, 50)), "b": np.zeros((3, 70))})
    assert all(s["lo"] == s["hi"] == s["mean"] == 0 for s in zero.values()) and set(zero) == {"a", "b", "pooled"}


def write_run(folder, before: list[int], after: list[int], keys=None) -> str:
    folder.mkdir(parents=True)
    keys = keys or [f"k{i}" for i in range(len(after))]
    lines = [{"when": when, "set": "t", "index": i, "key": keys[i], "correct": c, "margin": 0.0}
             for when, values in (("before", before), ("after", after)) for i, c in enumerate(values)]
    (folder / "eval_items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder)


def test_tables_pair_item_by_item_and_never_across_different_items(tmp_path):
    base = [0] * 100
    reference = [1] * 50 + [0] * 50  # 50 %
    better = [1] * 60 + [0] * 40  # 60 %: +10 points on the same items
    rows = [{"method": m, "task": t, "seed": s, "run_dir": write_run(tmp_path / m / t / str(s), base, values)}
            for t in ("t1", "t2") for s in (0, 1) for m, values in (("A", reference), ("B", better))]
    rows.append({"method": "C", "task": "t1", "seed": 0,  # scored on other items: never paired
                 "run_dir": write_run(tmp_path / "C", base, better, keys=[f"x{i}" for i in range(100)])})
    lines = paired_item_lines(rows, ["A", "B", "C"], ["t1", "t2"])
    assert "## A − each method, paired item by item" in lines
    b_line = next(line for line in lines if line.startswith("| B | -10.0 ["))  # A − B
    cells = b_line.split(" | ")
    assert cells[1].startswith("-10.0") and cells[2].startswith("-10.0") and cells[3].startswith("-10.0")
    assert cells[4] == "2"  # seeds behind the pooled column
    assert "| C | – | – | – | – | – |" in lines
    gains = lines[lines.index("## Gain over the base model, paired item by item"):]
    assert any(line.startswith("| A | +50.0 [") for line in gains) and any(line.startswith("| B | +60.0 [")
                                                                           for line in gains)
    assert not any("noise only" in line for line in lines)
    one_seed = paired_item_lines([r for r in rows if r["seed"] == 0], ["A", "B"], ["t1", "t2"])
    assert any("the interval covers the test items' noise only" in line for line in one_seed)
    assert paired_item_lines([{**r, "run_dir": str(tmp_path / "none")} for r in rows], ["A", "B"], ["t1"]) == []
