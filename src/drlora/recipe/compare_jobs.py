"""Running compare's runs several at a time (`drlora compare --jobs N`), each in its own process.

Why: on a CPU, one training run does not keep every core busy — its matrices are small, so threads spend much of
each step waiting for one another — and N runs with cores/N threads each finish a study sooner than the same runs
one after another with every core (bench/compare_jobs.py measures the ratio on the machine at hand). What a run
computes does not change: each run is the same `train()` on the same config in a fresh process; only the number of
threads differs, which can move float results by rounding (reductions split differently), never the method.

Each worker process writes its run's output to OUTPUT_DIR/logs/LABEL/TASK/seedN.log (two runs printing into one
terminal would be unreadable); compare prints one line as each run starts and ends. A failed run stops the study:
runs already started finish, nothing new starts, the finished ones are tabulated, and the error is raised.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing import get_context
from pathlib import Path


def threads_per_job(jobs: int) -> int:
    """The cores this process may use, shared out between `jobs` runs (at least one thread each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_logged(config, log_path: str) -> float:
    """One run in a worker, its output into its log file; returns its wall time."""
    from .run import train

    started = time.time()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        train(config, progress=False)
    return time.time() - started


def log_path(out: Path, run) -> Path:
    return out / "logs" / run.label / run.task_label / f"seed{run.seed}.log"


def run_parallel(out: Path, runs: list, jobs: int, on_finished) -> None:
    """Train every unfinished run of `runs`, `jobs` at a time, in spec order; `on_finished(run)` after each (the
    caller rewrites its tables there)."""
    from .compare import ACTIONS

    todo = [r for r in runs if r.state != "finished"]
    threads, n = threads_per_job(jobs), len(runs)
    print(f"drlora compare: {min(jobs, len(todo))} runs at a time, {threads} thread(s) each; each run's output goes "
          f"to {out / 'logs'}/", flush=True)
    index = {id(r): i for i, r in enumerate(runs, 1)}
    pending, error = list(todo), None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        running = {}

        def submit(run) -> None:
            print(f"[{index[id(run)]}/{n}] {run.name} ... {ACTIONS[run.state]} (log: {log_path(out, run)})", flush=True)
            config = dataclasses.replace(run.config, resume=run.state == "resume", overwrite=run.state == "changed")
            running[pool.submit(_train_logged, config, str(log_path(out, run)))] = run

        while pending and len(running) < jobs:
            submit(pending.pop(0))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                try:
                    seconds = future.result()
                except Exception as err:  # noqa: BLE001 - re-raised below, once the started runs are done
                    error = error or err
                    print(f"[{index[id(run)]}/{n}] {run.name}: failed (see {log_path(out, run)})", flush=True)
                    continue
                run.state = "finished"
                print(f"[{index[id(run)]}/{n}] {run.name}: finished in {seconds:.0f}s", flush=True)
                on_finished(run)
                if pending and error is None:
                    submit(pending.pop(0))
    if error is not None:
        raise error
