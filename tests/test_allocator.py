"""The pure allocator: schedule, saliency and growth plans, with hand-made numbers (no model)."""

import math

import pytest
import torch

from drlora import GrowthSchedule, plan_growth, saliency


def test_schedule_events_from_warmup_to_one_interval_before_the_end():
    s = GrowthSchedule.build(total_steps=1000, growth_interval=200, warmup_ratio=0.03, r_init=8, r_target=16,
                             grow_per_event=3)
    assert s.warmup_steps == 30
    assert s.events == (30, 230, 430, 630)
    assert s.phase(0) == "warmup" and s.phase(30) == "growth" and s.phase(631) == "fixed"
    assert not s.router_trainable(29) and s.router_trainable(30)
    assert s.events_left(230) == 3 and s.events_left(231) == 2


def test_infeasible_schedule_is_refused_with_working_values():
    with pytest.raises(ValueError, match="cannot reach r_target.*growth_interval <= "):
        GrowthSchedule.build(total_steps=500, growth_interval=200, warmup_ratio=0.03, r_init=8, r_target=16,
                             grow_per_event=3)


def test_growth_end_ratio_ends_the_events_earlier_and_the_budget_is_still_reached():
    s = GrowthSchedule.build(total_steps=1000, growth_interval=100, warmup_ratio=0.03, r_init=8, r_target=16,
                             grow_per_event=3, end_ratio=0.5)
    assert s.events == (30, 130, 230, 330, 430) and s.phase(431) == "fixed"
    with pytest.raises(ValueError, match="raise growth_end_ratio \\(now 0.2, ending growth at step 200\\)"):
        GrowthSchedule.build(total_steps=1000, growth_interval=100, warmup_ratio=0.03, r_init=8, r_target=16,
                             grow_per_event=3, end_ratio=0.2)
    from drlora import DRLoRAConfig

    with pytest.raises(ValueError, match="growth_end_ratio must be in \\(warmup_ratio, 1\\]"):
        DRLoRAConfig(growth_end_ratio=0.02)
    config = DRLoRAConfig(total_steps=1000, growth_interval=100, growth_end_ratio=0.5)
    assert config.schedule().events[-1] == 430 and DRLoRAConfig(total_steps=1000, growth_interval=100).schedule(
    ).events[-1] == 830


def test_saliency_matches_hand_computation():
    f = torch.tensor([[1.0, 3.0]])
    g = torch.tensor([[2.0, 2.0]])
    r = torch.tensor([[1, 3]])
    s = saliency(f, g, r, gamma=1.0)
    expected = torch.tensor([[0.25 * 0.5 / 2, 0.75 * 0.5 / 4]], dtype=torch.float64)
    torch.testing.assert_close(s, expected)


def test_saliency_zero_signal_falls_back_to_rank_penalty():
    s = saliency(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 2, 3]]), gamma=1.2)
    assert s[0, 0] > s[0, 1] > s[0, 2]


def test_plan_walks_by_saliency_with_deterministic_ties():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2]])
    ranks = torch.full((1, 4), 2)
    plan = plan_growth(scores, ranks, r_target=3, r_max=8, grow_per_event=2, events_left=2)
    # budget 12, remaining 4, quota ceil(4/2)=2: the first of the tied best experts takes it all
    assert plan.tolist() == [[0, 2, 0, 0]]


def _simulate(num_experts, r_init, r_target, r_max, grow, events, seed):
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.full((3, num_experts), r_init)
    totals = []
    for left in range(events, 0, -1):
        scores = torch.rand(3, num_experts, generator=generator) ** 4  # skewed
        plan = plan_growth(scores, ranks, r_target=r_target, r_max=r_max, grow_per_event=grow, events_left=left)
        assert (plan >= 0).all() and (plan <= grow).all()
        ranks = ranks + plan
        assert (ranks <= r_max).all()
        assert (ranks.sum(-1) <= num_experts * r_target).all(), "overshoot"
        totals.append(ranks.sum(-1))
    return ranks, totals


@pytest.mark.parametrize("seed", range(20))
def test_every_layer_lands_exactly_on_budget_at_the_last_event(seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    num_experts = int(torch.randint(2, 17, (1,), generator=generator))
    r_init = int(torch.randint(1, 6, (1,), generator=generator))
    r_target = r_init + int(torch.randint(0, 8, (1,), generator=generator))
    r_max = r_target + int(torch.randint(0, 8, (1,), generator=generator))
    grow = int(torch.randint(1, 4, (1,), generator=generator))
    events = math.ceil(max(r_target - r_init, 1) / grow) + int(torch.randint(0, 4, (1,), generator=generator))
    ranks, totals = _simulate(num_experts, r_init, r_target, r_max, grow, events, seed)
    assert (ranks.sum(-1) == num_experts * r_target).all()
    if r_target > r_init and events > 1:  # no early stop: the target is not reached before the last event
        assert (totals[-2] < num_experts * r_target).all()


def test_exact_budget_when_target_equals_max_with_tight_schedule():
    ranks, _ = _simulate(num_experts=8, r_init=2, r_target=8, r_max=8, grow=2, events=3, seed=0)
    assert (ranks == 8).all()


def test_skewed_scores_give_heterogeneous_ranks():
    ranks = torch.full((1, 8), 2)
    scores = torch.tensor([[8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05]])
    for left in range(4, 0, -1):
        ranks = ranks + plan_growth(scores, ranks, r_target=4, r_max=8, grow_per_event=2, events_left=left)
    assert ranks.sum() == 32
    assert ranks[0, 0] > ranks[0, -1]
