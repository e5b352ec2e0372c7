"""`drlora train` across processes: a run killed with SIGKILL resumes to a bit-identical adapter and rank map; two
processes under `accelerate launch` grow identical rank maps, with DDP and with FSDP2 (configs/accelerate/fsdp2.yaml),
and FSDP2 checkpoints resume bit-identically; sharding drlora cannot run is refused in one sentence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    # 12 steps per epoch: killed in the second epoch, whose order the resumed run must replay (it did not, before
    # ResumableLengthGroupedSampler: the Trainer drew it from the RNG state of the checkpoint)
    marker = killed / "checkpoints" / "checkpoint-15" / "drlora_complete"
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


def accelerate_launch(asset_dir, out, tmp_path, launcher_args, program, *extra):
    """`drlora train` in 2 gloo processes under `accelerate launch` (12 steps, 6 per epoch, checkpoints every 4)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *program, "train",
              *overrides(asset_dir, out, "train.max_steps=12", *extra)]
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))  # the shim imports from tests/
    result = subprocess.run(launch, env={**env(tmp_path), "PYTHONPATH": path}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


TESTS = Path(__file__).parent
DDP = (["--multi_gpu"], ["-m", "drlora.cli"])
# accelerate selects FSDP only on accelerators; the shim makes this one decision on a CPU machine (its docstring)
FSDP2 = (["--config_file", str(TESTS.parent / "configs/accelerate/fsdp2.yaml")], [str(TESTS / "fsdp2_on_cpu.py")])


@pytest.fixture(scope="module")
def ddp_run(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ddp") / "run"
    accelerate_launch(assets, out, out.parent, *DDP)
    return out


@pytest.fixture(scope="module")
def fsdp2_run(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    accelerate_launch(assets, out, out.parent, *FSDP2)
    return out


def test_two_processes_under_accelerate_launch_grow_identical_rank_maps(ddp_run):
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_maps_checked_across_processes"] == 2
    events = [json.loads(line) for line in (ddp_run / "ranks.jsonl").read_text().splitlines()]
    assert len(events) == metrics["growth_events"] and events[-1]["ranks"] == metrics["rank_map"]
    assert all(sum(layer) == 8 * 4 for layer in metrics["rank_map"])


def test_fsdp2_under_accelerate_trains_and_checkpoints_sharded_and_matches_ddp_bit_for_bit(fsdp2_run, ddp_run):
    """configs/accelerate/fsdp2.yaml: the factors are sharded (the optimizer state is saved sharded, by DCP), every
    checkpoint and the final adapter hold drlora's files, and the run is DDP's run on the same data split — FSDP2
    reduce-scatters the same gradients DDP all-reduces, so nothing may differ."""
    metrics = json.loads((fsdp2_run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_maps_checked_across_processes"] == 2
    for checkpoint in ("checkpoint-8", "checkpoint-12"):
        names = {p.name for p in (fsdp2_run / "checkpoints" / checkpoint).iterdir()}
        assert {"optimizer_0", "training_state.safetensors", "adapter_model.safetensors", "drlora_complete"} <= names
    ddp = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["rank_map"] == ddp["rank_map"] and metrics["eval_after"] == ddp["eval_after"]
    assert metrics["train_loss"]["curve"] == ddp["train_loss"]["curve"]
    for name in ("adapter/adapter_model.safetensors", "ranks.jsonl"):
        assert (fsdp2_run / name).read_bytes() == (ddp_run / name).read_bytes(), name


def test_fsdp2_run_resumed_in_its_second_epoch_ends_bit_identical(assets, fsdp2_run, tmp_path):  # noqa: F811
    """As if killed after checkpoint-8 (step 2 of epoch 1): the sharded model restores drlora's state on every
    process, DCP the sharded optimizer, and the epoch replays in the same order."""
    resumed = tmp_path / "run"
    shutil.copytree(fsdp2_run, resumed)
    for later in ("checkpoints/checkpoint-12", "adapter", "metrics.json"):
        path = resumed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = accelerate_launch(assets, resumed, tmp_path, *FSDP2, "resume=true")
    assert "resuming from checkpoint-8" in result.stdout
    for name in ("adapter/adapter_model.safetensors", "ranks.jsonl"):
        assert (resumed / name).read_bytes() == (fsdp2_run / name).read_bytes(), name


@pytest.mark.parametrize("environment, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "supports FSDP2, not FSDP1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
     "fsdp_cpu_ram_efficient_loading must be false"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "does not support DeepSpeed ZeRO-3"),
])
def test_sharding_drlora_cannot_run_is_refused_in_one_sentence_before_anything_is_written(
        assets, tmp_path, environment, message):  # noqa: F811
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "drlora.cli", "train", *overrides(assets, out)],
                            env={**env(tmp_path), **environment}, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not out.exists()
