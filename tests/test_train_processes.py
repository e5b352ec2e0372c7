"""`drlora train` across processes: a run killed with SIGKILL resumes to a bit-identical adapter and rank map, and
two processes under `accelerate launch` grow identical rank maps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_train import assets, overrides  # noqa: F401  (the module-scoped tiny model, data and run overrides)

pytestmark = pytest.mark.slow


def env(tmp_path):
    return {**os.environ, "DRLORA_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def drlora_train(args, tmp_path, **kwargs):
    return subprocess.run([sys.executable, "-m", "drlora.cli", "train", *args], env=env(tmp_path),
                          capture_output=True, text=True, timeout=600, **kwargs)


def test_resume_after_sigkill_gives_a_bit_identical_adapter_and_rank_map(assets, tmp_path):  # noqa: F811
    args = lambda out: overrides(assets, out, "train.max_steps=60", "train.save_steps=5")  # noqa: E731
    full = drlora_train(args(tmp_path / "full"), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "drlora.cli", "train", *args(killed)], env=env(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "checkpoint-10" / "drlora_complete"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (killed / "metrics.json").exists(), "the run was not killed mid-way"

    resumed = drlora_train([*args(killed), "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-" in resumed.stdout
    for name in ("adapter/adapter_model.safetensors", "ranks.jsonl"):
        assert (killed / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (killed, tmp_path / "full"))
    assert a["rank_map"] == b["rank_map"] and a["eval_after"] == b["eval_after"]


def test_two_processes_under_accelerate_launch_grow_identical_rank_maps(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "drlora.cli", "train",
              *overrides(assets, out, "train.max_steps=12")]
    result = subprocess.run(launch, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_maps_checked_across_processes"] == 2
    events = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    assert len(events) == metrics["growth_events"] and events[-1]["ranks"] == metrics["rank_map"]
    assert all(sum(layer) == 8 * 4 for layer in metrics["rank_map"])
