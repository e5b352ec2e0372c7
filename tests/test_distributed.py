"""Two gloo processes with different data make identical growth decisions (statistics are all-reduced)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drlora import get_dr_lora_model
from tiny_models import small_config, tiny_moe, token_batch

STEPS = 12


def _worker(rank: int, world: int, store: str, out: str, use_ddp: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = get_dr_lora_model(tiny_moe("olmoe", seed=0), small_config(total_steps=STEPS))
        trained = torch.nn.parallel.DistributedDataParallel(model) if use_ddp else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        micro_batches = 2 if use_ddp else 1
        for step in range(STEPS):
            for micro in range(micro_batches):
                x = token_batch(seed=1_000 * rank + 10 * step + micro)  # different data on every process
                if rank == 1:
                    x = x % 32  # and a different token distribution, so routing differs too
                with trained.no_sync() if use_ddp and micro < micro_batches - 1 else _nothing():
                    (trained(x, labels=x).loss / micro_batches).backward()
            model.update_and_allocate(step)
            optimizer.step()
            optimizer.zero_grad()
        result = {"ranks": model.rank_map().tolist(),
                  "frequency": [a.frequency.ema.tolist() for a in model.adapters],
                  "lora_B": [lora.lora_B.detach().flatten()[:64].tolist() for lora in model.expert_loras()]}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run(tmp_path, use_ddp):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), use_ddp), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_with_different_data_grow_identically(tmp_path):
    a, b = _run(tmp_path, use_ddp=False)
    assert a["ranks"] == b["ranks"]
    assert a["frequency"] == b["frequency"]
    ranks = torch.tensor(a["ranks"])
    assert (ranks.sum(-1) == 8 * 4).all()
    assert len(set(ranks.flatten().tolist())) > 1
    assert a["lora_B"] != b["lora_B"]  # no DDP: the LoRA weights themselves differ, the decisions do not


@pytest.mark.slow
def test_ddp_with_gradient_accumulation_keeps_processes_identical(tmp_path):
    a, b = _run(tmp_path, use_ddp=True)
    assert a["ranks"] == b["ranks"]
    assert a["lora_B"] == b["lora_B"]
    assert (torch.tensor(a["ranks"]).sum(-1) == 8 * 4).all()
