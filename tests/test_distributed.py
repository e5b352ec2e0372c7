"""Two gloo processes on CPU make identical growth decisions from different data (statistics are all-reduced).

One `torch.multiprocessing.spawn` serves every test of this file (spawning and importing transformers is most of the
cost): each process builds the same tiny OLMoE (same seed) and trains it on its own, skewed data —

* `plain`: no DDP, so the LoRA weights drift apart, but the growth decisions must not;
* `ddp` / `ddp_nobcast`: DistributedDataParallel with 2 micro-batches of gradient accumulation (`no_sync` on the
  first), with and without DDP's buffer sync at every forward — without it, only the all-reduce of the statistics keeps
  the rank masks (buffers) in step, so nothing can hide a divergent decision.
"""

import datetime
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from drlora import get_dr_lora_model
from tiny_models import small_config, tiny_moe, token_batch

WORLD = 2
NUM_EXPERTS, R_TARGET = 8, 4
# plain: warmup 2, events at 2, 5, 8; ddp: warmup 1, events at 1, 3, 5 (2 new ranks per expert per event at most)
PLAIN = dict(steps=12, growth_interval=3)
DDP = dict(steps=8, growth_interval=2)


def skewed_batch(rank: int, step: int, micro: int = 0) -> torch.Tensor:
    """Different data on every process, from a narrow vocabulary slice of its own, so routing is skewed, and skewed
    differently on each process."""
    return 16 * rank + token_batch(seed=1_000 * rank + 10 * step + micro) % 16


def _ddp(model, sync_buffers: bool) -> DistributedDataParallel:
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13
        return DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
    return DistributedDataParallel(model, broadcast_buffers=sync_buffers)


def _train(rank: int, steps: int, growth_interval: int, ddp: bool, sync_buffers: bool = True,
           dtype: torch.dtype = torch.float32) -> dict:
    model = get_dr_lora_model(tiny_moe("olmoe", seed=0, dtype=dtype),
                              small_config(total_steps=steps, growth_interval=growth_interval))
    wrapped = _ddp(model, sync_buffers) if ddp else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    micro_batches = 2 if ddp else 1
    events, local_mass = [], None
    model.train()
    for step in range(steps):
        for micro in range(micro_batches):
            x = skewed_batch(rank, step, micro)
            last = micro == micro_batches - 1
            with wrapped.no_sync() if ddp and not last else _Nothing():
                (wrapped(x, labels=x).loss / micro_batches).backward()
        if step == 0:  # this process's own routing mass, before the all-reduce inside update_and_allocate
            local_mass = torch.stack([a.frequency.step_mass.clone() for a in model.adapters])
        event = model.update_and_allocate(step)
        if event is not None:
            events.append(event.step)
        optimizer.step()
        optimizer.zero_grad()
    return {"ranks": model.rank_map(), "events": events, "local_mass": local_mass,
            "frequency": [a.frequency.ema.clone() for a in model.adapters],
            "importance": [lora.importance.ema.clone() for lora in model.expert_loras()],
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {"plain": _train(rank, PLAIN["steps"], PLAIN["growth_interval"], ddp=False),
                   "ddp": _train(rank, DDP["steps"], DDP["growth_interval"], ddp=True),
                   "ddp_nobcast": _train(rank, DDP["steps"], DDP["growth_interval"], ddp=True,
                                         sync_buffers=False),
                   # a bf16 model: DDP reduces the float32 masters of the LoRA factors and routers
                   "ddp_bf16": _train(rank, DDP["steps"], DDP["growth_interval"], ddp=True, dtype=torch.bfloat16)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _assert_budget(ranks: torch.Tensor) -> None:
    assert ranks.shape == (2, NUM_EXPERTS)
    assert (ranks.sum(-1) == NUM_EXPERTS * R_TARGET).all(), ranks
    assert len(set(ranks.flatten().tolist())) > 1, f"rank map is uniform: {ranks}"


@pytest.mark.slow
def test_two_processes_with_different_data_grow_identically(runs):
    a, b = runs[0]["plain"], runs[1]["plain"]
    # the processes really saw different, skewed routing ...
    assert not torch.equal(a["local_mass"], b["local_mass"])
    for mass in (a["local_mass"], b["local_mass"]):
        assert (mass.max(-1).values > 2 * mass.min(-1).values).all(), mass
    assert any(not torch.equal(a["trainable"][n], b["trainable"][n]) for n in a["trainable"])  # no DDP
    # ... and still hold the same statistics and took the same decisions
    assert a["events"] == b["events"] == [2, 5, 8]
    for fa, fb in zip(a["frequency"], b["frequency"]):
        assert torch.equal(fa, fb)
    for ia, ib in zip(a["importance"], b["importance"]):
        assert torch.equal(ia, ib)
    assert torch.equal(a["ranks"], b["ranks"])
    _assert_budget(a["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddp", "ddp_nobcast", "ddp_bf16"])
def test_ddp_with_gradient_accumulation_keeps_processes_identical(runs, variant):
    a, b = runs[0][variant], runs[1][variant]
    assert not torch.equal(a["local_mass"], b["local_mass"])
    assert a["events"] == b["events"] == [1, 3, 5]
    assert torch.equal(a["ranks"], b["ranks"])
    _assert_budget(a["ranks"])
    for fa, fb in zip(a["frequency"], b["frequency"]):
        assert torch.equal(fa, fb)
    assert a["trainable"].keys() == b["trainable"].keys()
    assert {n.rsplit(".", 1)[-1] for n in a["trainable"]} == {"lora_A", "lora_B", "weight"}  # weight: mlp.gate
    for name in a["trainable"]:  # LoRA A and B of every layer and projection, and the routers
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
        assert a["trainable"][name].dtype == torch.float32  # float32 masters also in the bf16 model
