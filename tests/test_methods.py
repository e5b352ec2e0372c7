"""The baselines of `method=`: their allocations (pure), their budgets (equal to uniform LoRA at r_target), and
each one training, saving and evaluating through `drlora train` on a tiny MoE."""

import json

import pytest
import torch
from test_train import assets, overrides  # noqa: F401  (the module-scoped tiny model and data)
from tiny_models import tiny_moe, token_batch

from drlora import DRLoRAConfig, get_dr_lora_model
from drlora.allocator import cubic_budget, esft_ranks, plan_pruning, proportional_ranks
from drlora.loading import load_model
from drlora.recipe.config import ConfigError, load_config
from drlora.recipe.run import train
from drlora.routing_stats import measure_routing


# ---- pure allocations -------------------------------------------------------------------------------------------------
def test_proportional_ranks_follow_frequency_under_the_exact_budget_and_cap():
    freq = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]])
    ranks = proportional_ranks(freq, r_target=4, r_max=8)
    assert ranks.sum(-1).tolist() == [16, 16, 16] and int(ranks.max()) <= 8
    assert ranks[0].tolist() == [8, 3, 3, 2]  # capped at r_max, the rest shared in proportion (ties: lower index)
    assert ranks[1].tolist() == [4, 4, 4, 4] and ranks[2].tolist() == [0, 0, 8, 8]


def test_esft_adapts_the_experts_covering_top_p_and_shares_the_budget():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    ranks = esft_ranks(scores, top_p=0.75, r_target=4)
    assert ranks.tolist() == [[8, 8, 0, 0], [8, 0, 0, 8]]  # layer 1: 0.7 + 0.1 (index 0 first on the tie) >= 0.75
    assert esft_ranks(scores, top_p=0.85, r_target=4)[1].tolist() == [5, 5, 0, 6]  # 16 over 3: first chosen +1
    assert ranks.sum(-1).tolist() == [16, 16]
    with pytest.raises(ValueError, match="top_p"):
        esft_ranks(scores, top_p=0.0, r_target=4)


def test_cubic_budget_prunes_fast_first_and_ends_exactly_at_the_target():
    budgets = [cubic_budget(k, 5, 64, 32) for k in range(5)]
    assert budgets[-1] == 32 and budgets == sorted(budgets, reverse=True)
    assert 64 - budgets[0] > budgets[-2] - budgets[-1]  # the first cut is the biggest


def test_plan_pruning_keeps_the_highest_scored_active_slots():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.05]])
    active = torch.tensor([[True, True, True], [True, False, True]])
    assert plan_pruning(scores, active, 3).tolist() == [[True, False, True], [True, False, False]]
    assert plan_pruning(scores, active, 9).tolist() == active.tolist()


# ---- the engine's allocations --------------------------------------------------------------------------------------
def test_importance_only_ignores_the_routing_frequency():
    model = get_dr_lora_model(tiny_moe("olmoe"), DRLoRAConfig(r_init=2, r_target=4, r_max=8, total_steps=40,
                                                               growth_interval=4, signal="importance"))
    for adapter in model.adapters:
        adapter.frequency.ema.copy_(torch.linspace(0.0, 1.0, adapter.frequency.ema.numel()))
        for lora in adapter.projections.values():
            lora.importance.ema.fill_(1.0)
    scores = model.saliency()
    assert torch.allclose(scores, scores[:, :1].expand_as(scores))  # uniform: f does not enter
    model.drlora_config.signal = "routing*importance"
    assert not torch.allclose(model.saliency(), scores)


def test_pruning_leaves_gaps_that_save_and_load_keep(tmp_path):
    from drlora.saving import load_dr_lora_model

    config = DRLoRAConfig(r_target=4, r_max=8, total_steps=20, growth_interval=4, allocation="prune")
    model = get_dr_lora_model(tiny_moe("olmoe"), config)
    generator = torch.Generator().manual_seed(0)
    for lora in model.expert_loras():
        lora.lora_B.data.normal_(generator=generator)
        lora.importance.ema.uniform_(generator=generator)
    assert model.rank_map().eq(8).all()
    for step in range(20):
        model.update_and_allocate(step)
    mask = model.expert_loras()[0].rank_mask
    assert model.rank_map().sum(-1).tolist() == [8 * 4] * len(model.adapters)
    assert (mask.long().diff(dim=-1) > 0).any()  # an inactive slot below an active one: a gap
    x = token_batch(1)
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_dr_lora_model(tiny_moe("olmoe"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, expected, atol=1e-5)


def test_measured_routing_counts_real_tokens_only():
    model = tiny_moe("olmoe")
    seqs = token_batch(0, batch=3, length=10).tolist()
    alone = measure_routing(model, seqs, batch_size=1)
    padded = measure_routing(model, [seqs[0][:4], *seqs[1:]], batch_size=3)
    assert alone["tokens"] == 30 and padded["tokens"] == 24
    top_k = model.config.num_experts_per_tok
    assert torch.allclose(alone["token"].sum(-1), torch.full((alone["token"].shape[0],), float(top_k)))
    assert torch.allclose(alone["gate"], measure_routing(model, seqs, batch_size=3)["gate"], atol=1e-5)


# ---- every method through `drlora train` ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "static-freq", "esft", "adalora-prune", "importance-only"])
def test_each_method_trains_saves_and_evaluates_at_the_uniform_budget(assets, tmp_path, method):  # noqa: F811
    out = tmp_path / method
    extra = ["baseline.calibration_rows=16", "baseline.esft_top_p=0.4"]
    metrics = train(load_config(None, overrides(assets, out, f"method={method}", *extra)), progress=False)
    ranks = torch.tensor(metrics["rank_map"])
    assert ranks.sum(-1).tolist() == [8 * 4] * ranks.shape[0]  # every layer ends at num_experts * r_target
    uniform = torch.full_like(ranks, 4)
    assert (ranks == uniform).all() == (method == "lora")
    if method == "esft":
        assert (ranks == 0).any() and metrics["method_details"]["experts_adapted"] == int((ranks > 0).sum())
    events = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    assert (len(events) > 0) == (method in ("adalora-prune", "importance-only"))
    # the published adapter computes what the trained model computed (pruning leaves gaps in the masks)
    task = str(assets / "eval.jsonl")
    model, _ = load_model(str(assets / "model"), adapter=out)
    assert model.rank_map().tolist() == metrics["rank_map"]
    from drlora.run_eval import evaluate_model

    again = evaluate_model(str(assets / "model"), task, adapter=out, progress=False)["results"][task]
    assert {k: again[k] for k in ("acc", "acc_norm", "n")} == metrics["eval_after"][task]


@pytest.mark.slow
def test_active_parameters_equal_uniform_lora_at_r_target(assets, tmp_path):  # noqa: F811
    counts = {}
    for method in ("lora", "static-freq", "esft", "adalora-prune", "dr-lora"):
        metrics = train(load_config(None, overrides(assets, tmp_path / method, f"method={method}", "train.max_steps=8",
                                                    "baseline.calibration_rows=16")), progress=False)
        counts[method] = metrics["parameters"]
    assert len({c["active"] for c in counts.values()}) == 1, counts
    assert counts["lora"]["reserved"] == counts["lora"]["active"]  # lora at r_target reserves only what it uses
    assert counts["dr-lora"]["reserved"] == 2 * counts["dr-lora"]["active"]  # r_max = 2 r_target


def test_a_method_that_fixes_an_engine_setting_refuses_it():
    with pytest.raises(ConfigError, match="sets drlora.allocation itself"):
        load_config(None, ["method=lora", "drlora.allocation=grow"])
    with pytest.raises(ConfigError, match="did you mean 'esft'"):
        load_config(None, ["method=estf"])


@pytest.mark.slow
def test_peft_lora_trains_through_the_same_pipeline_and_its_adapter_reloads(assets, tmp_path):  # noqa: F811
    out = tmp_path / "peft"
    metrics = train(load_config(None, overrides(assets, out, "method=peft-lora", "train.max_steps=6")),
                    progress=False)  # the default lora_dropout (0.1) does not apply: PEFT refuses it on parameters
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # PEFT adapts the fused gate_up parameter whole: more parameters than drlora's up + down at the same rank
    p = metrics["parameters"]
    assert p["active"] == p["reserved"] == p["trainable"] > 0
    task = str(assets / "eval.jsonl")
    from drlora.run_eval import evaluate_model

    again = evaluate_model(str(assets / "model"), task, adapter=out, progress=False)["results"][task]
    assert {k: again[k] for k in ("acc", "acc_norm", "n")} == metrics["eval_after"][task]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it trained
