"""The run report: rank heatmap PNG and text summary, from fake run folders (no model, no training)."""

import json
import struct

import numpy as np
import pytest
import yaml

from drlora.recipe.report import draw_heatmap, heatmap_figure, report, summary

# L=3, E=4, r_init 2, r_target 4, r_max 8: each layer's total grows 8 -> 10 -> 13 -> 16 over three events
SMALL_EVENTS = [
    (10, [[4, 2, 2, 2], [2, 2, 3, 3], [2, 3, 3, 2]]),
    (20, [[6, 3, 2, 2], [2, 2, 5, 4], [3, 4, 3, 3]]),
    (30, [[8, 4, 2, 2], [2, 2, 6, 6], [3, 5, 4, 4]]),
]


def make_run(root, rank_events, final, *, r_init=2, r_target=4, r_max=8, steps=40, names=None,
             eval_before=None, eval_after=None, ranks_text=None):
    """A run folder as `drlora train` leaves it (minus adapter/ and checkpoints/)."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model": "tiny/moe", "method": "dr-lora", "output_dir": str(root), "seed": 0,
              "data": {"train": ["alpaca"], "eval": "arc_easy", "eval_split": "validation", "eval_limit": 200},
              "train": {"learning_rate": 1e-4}, "drlora": {"r_init": r_init, "r_target": r_target, "r_max": r_max}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    lines, previous = [], np.full(np.shape(final), r_init)
    for step, ranks in rank_events:
        grown = (np.asarray(ranks) - previous).tolist()
        previous = np.asarray(ranks)
        top = np.argsort(-np.asarray(ranks), axis=1, kind="stable")[:, :3].tolist()
        lines.append(json.dumps({"step": step, "ranks": ranks, "grown": grown, "layers_below_target": 0,
                                 "top_saliency": top}))
    (root / "ranks.jsonl").write_text(ranks_text if ranks_text is not None else "".join(x + "\n" for x in lines))
    n_layers = len(final)
    metrics = {
        "status": "completed", "model": "tiny/moe", "method": "dr-lora", "steps": steps, "wall_time_s": 3725.4,
        "train_tokens_per_s": 12345.67, "tokens_seen": 4567890,
        "train_loss": {"first": 2.5, "last": 1.25, "min": 1.2, "curve": [[10, 2.5], [40, 1.25]]},
        "eval_before": eval_before, "eval_after": eval_after,
        "parameters": {"active": 1234567, "reserved": 9876543, "trainable": 9876543, "total": 123456789},
        "rank_map": final, "layer_names": names or [f"model.layers.{i}.mlp.experts" for i in range(n_layers)],
        "r_init": r_init, "r_target": r_target, "r_max": r_max, "growth_events": len(rank_events),
        "some_future_key": {"ignored": True},
    }
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return root


@pytest.fixture
def small(tmp_path):
    return make_run(tmp_path / "small", SMALL_EVENTS, SMALL_EVENTS[-1][1],
                    names=[f"model.layers.{i}.mlp.experts" for i in (1, 3, 5)],
                    eval_before={"arc_easy": {"acc": 0.5, "acc_norm": 0.45, "n": 200}},
                    eval_after={"arc_easy": {"acc": 0.56, "acc_norm": 0.44, "n": 200},
                                "gsm8k": {"exact_match": 0.12, "n": 50}})


@pytest.fixture
def large(tmp_path):
    rng = np.random.default_rng(0)
    layers, experts, r_init, r_max = 24, 64, 4, 32
    ranks, events = np.full((layers, experts), r_init), []
    for step in (50, 100, 150, 200, 250):
        for layer in range(layers):  # grow a few random experts per layer, capped at r_max
            for expert in rng.choice(experts, size=16, replace=False):
                ranks[layer, expert] = min(r_max, ranks[layer, expert] + 4)
        events.append((step, ranks.tolist()))
    return make_run(tmp_path / "large", events, ranks.tolist(), r_init=r_init, r_target=8, r_max=r_max, steps=300)


def png_size(path):
    """(width, height) from the PNG header, after checking the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_small_heatmap_is_a_png_and_leaves_no_temp_files(small):
    path = draw_heatmap(small)
    assert path == small / "rank_heatmap.png"
    width, height = png_size(path)
    assert width > 800 and height > 300 and path.stat().st_size > 20_000
    assert sorted(p.name for p in small.iterdir()) == ["config.yaml", "metrics.json", "rank_heatmap.png",
                                                      "ranks.jsonl"]


def test_small_heatmap_annotates_cells_and_labels_layers(small):
    fig = heatmap_figure(small)
    heat, growth = fig.axes[:2]
    assert sorted(t.get_text() for t in heat.texts) == sorted(str(r) for row in SMALL_EVENTS[-1][1] for r in row)
    assert [t.get_text() for t in heat.get_yticklabels()] == ["L1", "L3", "L5"]
    assert "mean 4.00" in heat.get_title() and "target 4" in heat.get_title()
    # the mean (every layer's budget curve) and each layer's most-grown expert, from r_init at step 0 through the
    # three events to the final map at `steps`
    lines = {line.get_label(): line for line in growth.get_lines()}
    assert sorted(k for k in lines if k.startswith("L")) == ["L1 max", "L3 max", "L5 max"]
    assert list(lines["mean"].get_xdata()) == [0, 10, 20, 30, 40]
    assert list(lines["mean"].get_ydata()) == [2.0, 2.5, 3.25, 4.0, 4.0]
    maxima = [[max(row) for row in ranks] for _, ranks in SMALL_EVENTS]
    assert list(lines["L1 max"].get_ydata()) == [2.0] + [float(m[0]) for m in maxima] + [float(maxima[-1][0])]
    assert any(line.get_linestyle() == "--" and set(line.get_ydata()) == {4} for line in growth.get_lines())
    assert growth.get_legend() is not None


def test_large_heatmap_has_no_annotations_and_thinned_ticks(large):
    fig = heatmap_figure(large)
    heat, growth = fig.axes[:2]
    assert len(heat.texts) == 0
    assert 2 <= len(heat.get_xticks()) <= 24 and 2 <= len(heat.get_yticks()) <= 24
    assert growth.get_legend() is None
    path = draw_heatmap(large, large / "elsewhere.png")
    assert path == large / "elsewhere.png" and png_size(path)[0] > 1000
    assert not any(p.name.startswith(".") for p in large.iterdir())


def test_summary_small_exact_lines(small):
    text = summary(small)
    lines = text.splitlines()
    assert "model tiny/moe   method dr-lora   status completed" in lines
    assert "steps 40   wall time 1h 02m 05s   12,345.7 tokens/s   4,567,890 tokens seen" in lines
    arc = [line.split() for line in lines if line.startswith("arc_easy")]
    assert arc == [["arc_easy", "acc", "0.500", "→", "0.560", "+0.060", "200"],
                   ["arc_easy", "acc_norm", "0.450", "→", "0.440", "-0.010", "200"]]
    assert [line.split() for line in lines if line.startswith("gsm8k")] == [
        ["gsm8k", "exact_match", "-", "→", "0.120", "50"]]
    assert "parameters: active 1,234,567 / reserved 9,876,543 / trainable 9,876,543 (model total 123,456,789)" in lines
    assert ("ranks: min 2 / mean 4.00 / max 8 (r_init 2, r_target 4, r_max 8); 1 of 12 experts at r_max, "
            "4 still at r_init") in lines
    i = lines.index("where the ranks went (top 3 experts per layer):")
    assert lines[i + 1:i + 4] == ["  L1: e0=8 e1=4 e2=2", "  L3: e2=6 e3=6 e0=2", "  L5: e1=5 e2=4 e3=4"]
    assert lines[-1] == "growth events: 3 (last at step 30, 0 layer(s) below target then)"


def test_summary_without_eval_before_or_any_eval(tmp_path):
    final = SMALL_EVENTS[-1][1]
    only_after = make_run(tmp_path / "a", SMALL_EVENTS, final, eval_after={"arc_easy": {"acc": 0.56, "n": 9}})
    assert [line.split() for line in summary(only_after).splitlines() if line.startswith("arc_easy")] == [
        ["arc_easy", "acc", "-", "→", "0.560", "9"]]
    assert "eval: none (no eval set in this run)" in summary(make_run(tmp_path / "b", SMALL_EVENTS, final))


def test_no_growth_events(tmp_path):
    final = [[2, 2, 2, 2]] * 3
    for name, text in (("empty", ""), ("blank", "\n\n")):
        run = make_run(tmp_path / name, [], final, ranks_text=text)
        out = report(run)
        assert "growth events: 0" in out.splitlines()
        assert "12 still at r_init" in out
        growth = heatmap_figure(run).axes[1]
        assert "no growth events" in [t.get_text() for t in growth.texts]
        assert list(growth.get_lines()[0].get_ydata()) == [2.0, 2.0]
        png_size(run / "rank_heatmap.png")
    (run / "ranks.jsonl").unlink()  # a method without growth may write no ranks.jsonl at all
    assert "growth events: 0" in summary(run)


def test_report_returns_summary_and_png_path(small):
    out = report(small)
    assert out.startswith(summary(small))
    assert out.splitlines()[-1] == f"heatmap: {small / 'rank_heatmap.png'}"
    png_size(small / "rank_heatmap.png")


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, small):
    (small / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no metrics\.json, so its training has not finished; pass the "
                                                r"output_dir of a finished `drlora train` run"):
        report(small)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a drlora run folder \(it has no metrics\.json or config\.yaml\)"):
        report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        report(tmp_path / "nowhere")
    assert not (small / "rank_heatmap.png").exists()


def test_malformed_json_names_file_and_line(small):
    lines = (small / "ranks.jsonl").read_text().splitlines()
    (small / "ranks.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"ranks\.jsonl: line 2: not valid JSON"):
        report(small)
    (small / "ranks.jsonl").write_text("\n".join(lines) + "\n")
    (small / "metrics.json").write_text('{\n  "status": "completed",\n  "steps": 40,\n  oops\n}')
    with pytest.raises(ValueError, match=r"metrics\.json: line 4: not valid JSON"):
        report(small)
    assert not (small / "rank_heatmap.png").exists()
