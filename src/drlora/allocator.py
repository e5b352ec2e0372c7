"""Where the ranks are decided. Pure: statistics and ranks in, a growth plan out — no model, no torch.nn.

Two pieces:

* `GrowthSchedule` — when growth events happen (warmup → growth window → fixed stage).
* `plan_growth` — at one growth event, how many new ranks each expert of each layer activates.

The budget is counted exactly: every layer ends at `num_experts * r_target` active ranks (per adapted projection)
at the last growth event — never before, never above. The authors' code counts per expert but targets per module,
so it reaches the target after about half the events and overshoots; we do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GrowthSchedule:
    """When to grow. Steps are 0-based optimizer steps (the value `update_and_allocate` receives)."""

    total_steps: int
    warmup_steps: int
    growth_interval: int
    events: tuple[int, ...]

    @classmethod
    def build(cls, total_steps: int, growth_interval: int, warmup_ratio: float, r_init: int, r_target: int,
              grow_per_event: int, end_ratio: float = 1.0) -> GrowthSchedule:
        """Events every `growth_interval` steps from the end of warmup to one interval before the end (the
        paper's window) or, with `end_ratio` < 1, to step floor(end_ratio * total_steps) if that is earlier.

        Raises ValueError if the events cannot carry every expert from r_init to r_target (the uniform case,
        which is the binding one), with settings that would work.
        """
        warmup = math.ceil(warmup_ratio * total_steps)
        last = total_steps - growth_interval
        if end_ratio < 1.0:
            last = min(last, math.floor(end_ratio * total_steps))
        events = tuple(range(warmup, last + 1, growth_interval)) if last >= warmup else ()
        needed = r_target - r_init
        if needed > 0 and len(events) * grow_per_event < needed:
            message = _infeasible_message(total_steps, growth_interval, warmup, len(events), grow_per_event, needed)
            if end_ratio < 1.0:
                message = message[:-1] + (f", or raise growth_end_ratio (now {end_ratio}, ending growth at step "
                                          f"{last}).")
            raise ValueError(message)
        return cls(total_steps, warmup, growth_interval, events)

    @property
    def num_events(self) -> int:
        return len(self.events)

    def is_event(self, step: int) -> bool:
        return step in self.events

    def events_left(self, step: int) -> int:
        """Growth events at or after `step` (including `step` itself)."""
        return sum(1 for e in self.events if e >= step)

    def router_trainable(self, step: int) -> bool:
        """The router is frozen during warmup and trained from the first step after it."""
        return step >= self.warmup_steps

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return "warmup"
        if self.events and step <= self.events[-1]:
            return "growth"
        return "fixed"


def _infeasible_message(total_steps, interval, warmup, n_events, grow, needed) -> str:
    min_events = math.ceil(needed / grow)
    # largest interval giving min_events events: warmup + min_events * interval <= total_steps
    max_interval = (total_steps - warmup) // min_events if min_events else interval
    suggestions = [f"max_grow_per_event >= {math.ceil(needed / max(n_events, 1))}" if n_events else None,
                   f"growth_interval <= {max_interval}" if max_interval >= 1 else None,
                   f"total_steps >= {warmup + min_events * interval}"]
    tips = " or ".join(s for s in suggestions if s)
    return (f"the growth schedule cannot reach r_target: {total_steps} steps with warmup {warmup} and "
            f"growth_interval {interval} give {n_events} growth event(s) x {grow} rank(s) per event, but every "
            f"expert may need {needed} more; use {tips}.")


def saliency(frequency: torch.Tensor, importance: torch.Tensor, ranks: torch.Tensor, gamma: float) -> torch.Tensor:
    """Expert Saliency Score S = f̂ · ĝ / (r + 1)^γ, with f and g normalised to sum 1 within each layer.

    All inputs are [num_layers, num_experts]. A layer whose f (or g) is all zero gets a uniform f̂ (or ĝ), so the
    rank penalty alone decides there (it spreads growth evenly) instead of dividing by zero.
    """
    f = _normalise(frequency.double())
    g = _normalise(importance.double())
    return f * g / (ranks.double() + 1.0) ** gamma


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(0)
    total = x.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1])
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), uniform)


def plan_growth(scores: torch.Tensor, ranks: torch.Tensor, *, r_target: int, r_max: int, grow_per_event: int,
                events_left: int) -> torch.Tensor:
    """New ranks per expert at one growth event: LongTensor [num_layers, num_experts].

    For each layer below its budget `num_experts * r_target`:

    1. quota q = ceil(remaining / events_left) — spread evenly so the target is reached at the last event;
    2. walk experts by descending score (ties: lower index first), each taking up to `grow_per_event` new ranks
       (never past r_max) until the quota is used;
    3. feasibility repair: if what remains after this event could not fit in the later events (each expert can
       still take at most `grow_per_event` per event and never pass r_max), grant more now, again by score, to
       experts whose headroom the later events could not use. At the last event this grants all that remains.
    """
    if events_left < 1:
        raise ValueError(f"events_left must be >= 1 at a growth event, got {events_left}.")
    if scores.shape != ranks.shape or scores.dim() != 2:
        raise ValueError(f"scores and ranks must both be [num_layers, num_experts], got {tuple(scores.shape)} "
                         f"and {tuple(ranks.shape)}.")
    num_layers, num_experts = ranks.shape
    plan = torch.zeros_like(ranks, dtype=torch.long)
    budget = num_experts * r_target
    later = (events_left - 1) * grow_per_event  # most one expert can still grow after this event
    for layer in range(num_layers):
        r = [int(v) for v in ranks[layer]]
        remaining = budget - sum(r)
        if remaining <= 0:
            continue
        order = _descending(scores[layer])
        headroom = [r_max - v for v in r]
        cap = [min(grow_per_event, h) for h in headroom]
        grant = [0] * num_experts
        quota = math.ceil(remaining / events_left)
        for e in order:
            if quota == 0:
                break
            take = min(cap[e], quota)
            grant[e] += take
            quota -= take
        # deficit: ranks that would not fit in the later events
        def deficit() -> int:
            left = remaining - sum(grant)
            return left - sum(min(later, headroom[e] - grant[e]) for e in range(num_experts))

        short = deficit()
        for e in order:
            if short <= 0:
                break
            # granting now helps only where later events could not use the headroom anyway
            useful = min(cap[e] - grant[e], headroom[e] - grant[e] - later)
            if useful > 0:
                take = min(useful, short)
                grant[e] += take
                short -= take
        if short > 0:
            raise RuntimeError(f"layer {layer}: cannot place {short} rank(s) within the remaining events; "
                               "this is a bug in the schedule validation.")
        plan[layer] = torch.tensor(grant, dtype=torch.long)
    return plan


def _descending(row: torch.Tensor) -> list[int]:
    """Expert indices by descending score; equal scores keep index order (deterministic everywhere)."""
    return [int(i) for i in torch.sort(-row.double(), stable=True).indices]


# ---- the baselines' allocations (issue 5): same budget, other rules ---------------------------------------------------
def _largest_remainder(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers proportional to `shares` summing to `total`, each at most its cap (water-filling: what a capped entry
    cannot take goes to the others in proportion). Ties go to the lower index, so the result is deterministic."""
    n = len(shares)
    if total > sum(caps):
        raise ValueError(f"cannot place {total} ranks under caps summing to {sum(caps)}.")
    alloc = [0] * n
    free = [i for i in range(n) if caps[i] > 0]
    left = total
    while left > 0 and free:
        weight = sum(max(shares[i], 0.0) for i in free)
        ideal = {i: left * (max(shares[i], 0.0) / weight if weight > 0 else 1.0 / len(free)) for i in free}
        capped = [i for i in free if alloc[i] + ideal[i] >= caps[i]]
        if capped:  # saturate those and share the rest again
            for i in capped:
                left -= caps[i] - alloc[i]
                alloc[i] = caps[i]
            free = [i for i in free if i not in capped]
            continue
        floors = {i: math.floor(ideal[i]) for i in free}
        for i in free:
            alloc[i] += floors[i]
        left -= sum(floors.values())
        by_remainder = sorted(free, key=lambda i: (-(ideal[i] - floors[i]), i))
        for i in by_remainder[:left]:
            alloc[i] += 1
        left = 0
    return alloc


def proportional_ranks(frequency: torch.Tensor, *, r_target: int, r_max: int) -> torch.Tensor:
    """Static allocation by routing frequency: ranks ∝ f per layer, `num_experts * r_target` per layer exactly,
    each in [0, r_max]. `frequency` is [num_layers, num_experts]; returns LongTensor of the same shape."""
    num_layers, num_experts = frequency.shape
    rows = [_largest_remainder([float(v) for v in frequency[layer]], num_experts * r_target, [r_max] * num_experts)
            for layer in range(num_layers)]
    return torch.tensor(rows, dtype=torch.long)


def esft_ranks(scores: torch.Tensor, *, top_p: float, r_target: int) -> torch.Tensor:
    """ESFT: per layer, the experts with the highest scores until they cover `top_p` of the layer's score mass are
    adapted, sharing the layer's budget `num_experts * r_target` evenly; the others get rank 0. (The caller sizes
    r_max to the largest rank this returns.)"""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    num_layers, num_experts = scores.shape
    ranks = torch.zeros(num_layers, num_experts, dtype=torch.long)
    for layer in range(num_layers):
        share = _normalise(scores[layer:layer + 1].double())[0]
        chosen, covered = [], 0.0
        for e in _descending(share):
            chosen.append(e)
            covered += float(share[e])
            if covered >= top_p - 1e-12:
                break
        split = _largest_remainder([1.0] * len(chosen), num_experts * r_target, [num_experts * r_target] * len(chosen))
        for e, r in zip(chosen, split):
            ranks[layer, e] = r
    return ranks


def cubic_budget(event_index: int, num_events: int, start: int, end: int) -> int:
    """AdaLoRA's cubic schedule over the pruning events: the budget after event k (0-based) of n is
    end + (start - end) · (1 - (k + 1) / n)³ — fast pruning first, gentle near the end, exactly `end` at the last."""
    progress = (event_index + 1) / num_events
    return end + math.floor((start - end) * (1.0 - progress) ** 3)


def plan_pruning(scores: torch.Tensor, active: torch.Tensor, keep: int) -> torch.Tensor:
    """Rank slots to keep in one layer: the `keep` active slots of highest score (ties: lower expert, then lower rank
    index). `scores` and `active` are [num_experts, r_max]; returns the new boolean mask."""
    flat_active = active.reshape(-1).bool()
    if keep >= int(flat_active.sum()):
        return active.clone().bool()
    order = torch.sort(-scores.reshape(-1).double(), stable=True).indices
    kept = torch.zeros_like(flat_active)
    candidates = [int(i) for i in order if flat_active[i]]
    kept[candidates[:keep]] = True
    return kept.reshape(active.shape)
