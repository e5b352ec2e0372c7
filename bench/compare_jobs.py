"""Is `drlora compare --jobs 2` worth it here? Two training runs one after another with every core, against the same
two runs at once with half the cores each, on the builtin model, measured in one sitting.

    python bench/compare_jobs.py [--task sentiment] [--steps 12] [--batch-size 16] [--rounds 2]
                                 [--out runs/bench/compare_jobs.json]

Each run is a real `drlora train` (model load, training, no evaluation) in a fresh process. The rounds alternate
the two schedules (sequential, parallel, sequential, ...) because this machine's speed drifts; the ratio printed is
parallel wall time / sequential wall time per round (< 1: --jobs 2 finishes the same work sooner). Timings are
never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from drlora.recipe.config import config_from_mappings
from drlora.recipe.run import train
train(config_from_mappings({{"model": "builtin:smollm2-moe", "output_dir": sys.argv[2], "overwrite": True, "seed": 0,
    "data": {{"train": ["{task}"], "eval_before": False}},
    "train": {{"max_steps": {steps}, "batch_size": {batch}, "gradient_accumulation_steps": 1, "save_steps": 10000,
              "learning_rate": 1e-3}}}}), progress=False)
"""


def launch(code: str, threads: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(threads), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(processes) -> None:
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"a benchmark run failed:\n{err[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/compare_jobs.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    code = RUN.format(task=args.task, steps=args.steps, batch=args.batch_size)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            started = time.time()
            for k in range(2):
                finish([launch(code, cores, Path(tmp) / f"s{r}{k}")])
            sequential = time.time() - started
            started = time.time()
            finish([launch(code, max(1, cores // 2), Path(tmp) / f"p{r}{k}") for k in range(2)])
            parallel = time.time() - started
            rounds.append({"sequential_s": round(sequential, 1), "parallel_s": round(parallel, 1),
                           "ratio": round(parallel / sequential, 3)})
            print(f"round {r + 1}: two runs in turn ({cores} threads each) {sequential:.0f}s, at once "
                  f"({max(1, cores // 2)} each) {parallel:.0f}s: ratio {parallel / sequential:.2f}", flush=True)
    result = {"cores": cores, "task": args.task, "steps": args.steps, "batch_size": args.batch_size,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
