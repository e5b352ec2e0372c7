"""A NaN on one process stops every process: two gloo processes each train a tiny DR-LoRA model with DRLoRATrainer,
and only process 1 sees a non-finite loss (or non-finite gradients); both must raise NonFiniteError at the same step,
naming process 1, instead of process 0 waiting forever in its next all-reduce for a process that is gone.

The two workers are this file run as a script (`python test_nonfinite_processes.py RANK PORT OUT`), with the
environment torchrun would give them; they run both cases one after the other (one process start-up for both)."""

import faulthandler
import gc
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

MICRO_BATCHES, NAN_STEP = 2, 1  # gradient accumulation: process 1 stops after the first micro-batch of step 1
SCENARIOS = ("loss", "gradient")
TIMEOUT = 120  # seconds


def worker(rank: int, port: int, out: str) -> None:
    faulthandler.dump_traceback_later(TIMEOUT - 20, exit=True)  # a process stuck in an all-reduce shows where
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    import torch.distributed as dist
    from transformers import TrainerCallback, TrainingArguments

    from drlora import DRLoRACallback, get_dr_lora_model
    from drlora.recipe.trainer import DRLoRATrainer, FiniteGradientGuard
    from tiny_models import TokenRows, small_config, tiny_moe

    class NaNLossOnProcess1(DRLoRATrainer):
        """Process 1's loss becomes NaN (and so its gradients) on the first micro-batch of step NAN_STEP."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.scenario == "loss" and rank == 1 and self.state.global_step == NAN_STEP:
                loss = loss * float("nan")
            return loss

    class InfGradientOnProcess1(TrainerCallback):
        """After DDP's all-reduce, process 1 alone holds an infinite gradient at step NAN_STEP."""

        def __init__(self, scenario, model):
            self.scenario, self.model = scenario, model

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.scenario == "gradient" and rank == 1 and state.global_step == NAN_STEP:
                grad = next(p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None)
                grad.view(-1)[0] = float("inf")

    def run(scenario: str) -> dict:
        model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=None, growth_interval=2))
        args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=4, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=MICRO_BATCHES, learning_rate=1e-3, report_to=[],
                                 use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
        trainer = NaNLossOnProcess1(model=model, args=args, train_dataset=TokenRows(),
                                    callbacks=[InfGradientOnProcess1(scenario, model), FiniteGradientGuard(model),
                                               DRLoRACallback(model)])
        trainer.scenario = scenario
        try:
            trainer.train()
            return {"raised": None, "message": "finished"}
        except Exception as err:  # noqa: BLE001  (the test reports whatever each process ended with)
            return {"raised": type(err).__name__, "message": str(err)}

    outcomes = {}
    for scenario in SCENARIOS:
        outcomes[scenario] = run(scenario)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(outcomes, f)
    gc.collect()  # DDP's reducers go before their process group does (destroying them after it may hang)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_non_finite_loss_or_gradient_on_one_process_stops_both(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    port = free_port()
    logs = [tmp_path / f"process{rank}.log" for rank in (0, 1)]
    processes = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmp_path)], env=env,
                                  stdout=logs[rank].open("w"), stderr=subprocess.STDOUT) for rank in (0, 1)]
    deadline = time.time() + TIMEOUT
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    hung = [rank for rank, process in enumerate(processes) if process.poll() is None]
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    printed = "\n".join(f"--- process {rank}:\n{log.read_text()[-3000:]}" for rank, log in enumerate(logs))
    outcomes = [json.loads(f.read_text()) if (f := tmp_path / f"rank{rank}.json").is_file() else {} for rank in (0, 1)]
    assert not hung, f"process(es) {hung} still running after {TIMEOUT} s: {outcomes}\n{printed}"
    where = f"on process 1 of 2 at step {NAN_STEP}"
    expected = {"loss": [f"the training loss became non-finite {where}", f"the training loss became nan {where}"],
                "gradient": [f"the gradients became non-finite {where}"] * 2}
    for scenario in SCENARIOS:
        for rank, outcome in enumerate(outcomes):
            assert outcome.get(scenario) == {"raised": "NonFiniteError", "message": expected[scenario][rank]}, \
                (scenario, rank, outcomes, printed)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
