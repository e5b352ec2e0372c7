"""Invariants of the expert-LoRA layer on tiny models of several families: exactness at init, inert masked ranks,
function-preserving growth, dtype, and how routing statistics are counted."""

import types

import pytest
import torch

from drlora import get_dr_lora_model
from drlora.layer import dropout_keep_mask, kaiming_init
from tiny_models import FAMILIES, small_config, tiny_moe, token_batch, train


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits.clone()


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_base_at_init(family):
    base = tiny_moe(family)
    x = token_batch()
    reference = logits(base, x)
    model = get_dr_lora_model(base, small_config(target_projections=("gate", "up", "down")))
    assert torch.equal(logits(model, x), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_ranks_are_inert_and_get_zero_gradient(family):
    model = get_dr_lora_model(tiny_moe(family), small_config(target_projections=("gate", "up", "down")))
    x = token_batch()
    with torch.no_grad():  # non-trivial active ranks
        for lora in model.expert_loras():
            lora.lora_B.normal_(0, 0.1)
            lora.lora_B.mul_(lora.rank_mask.unsqueeze(1))
    before = logits(model, x)
    with torch.no_grad():  # scribble over every masked rank
        for lora in model.expert_loras():
            masked = ~lora.rank_mask
            lora.lora_A[masked] = torch.randn_like(lora.lora_A[masked])
            lora.lora_B.copy_(torch.where(masked.unsqueeze(1), torch.randn_like(lora.lora_B), lora.lora_B))
    assert torch.equal(logits(model, x), before)
    model.train()
    model(x, labels=x).loss.backward()
    for lora in model.expert_loras():
        masked = ~lora.rank_mask
        assert lora.lora_A.grad[masked].abs().max() == 0
        assert lora.lora_B.grad.transpose(1, 2)[masked].abs().max() == 0
        assert lora.lora_B.grad.abs().max() > 0  # active ranks do learn


@pytest.mark.parametrize("family", FAMILIES)
def test_growth_event_leaves_logits_unchanged(family):
    model = get_dr_lora_model(tiny_moe(family), small_config())
    train(model, steps=2)  # before the first event (step 2): B is non-zero now
    x = token_batch(seed=99)
    before = logits(model, x)
    for lora in model.expert_loras():
        lora.grow(torch.arange(lora.num_experts) % 3)
    assert torch.equal(logits(model, x), before)


def test_weight_decay_cannot_move_masked_ranks_and_new_ranks_start_as_initialised():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=40, growth_interval=10))
    train(model, steps=3, lr=0.1, weight_decay=0.5)  # through the first growth event (step 4 is the first)
    for lora in model.expert_loras():
        masked = ~lora.rank_mask
        assert lora.lora_B.transpose(1, 2)[masked].abs().max() == 0
        before = lora.ranks().clone()
        lora.grow(torch.ones(lora.num_experts, dtype=torch.long))
        initial = kaiming_init(lora.num_experts, lora.r_max, lora.in_features, lora.seed)
        for expert, r in enumerate(before.tolist()):
            assert torch.equal(lora.lora_A[expert, r], initial[expert, r])


def test_ranks_grow_only_where_saliency_points_and_budget_is_exact():
    model = get_dr_lora_model(tiny_moe("mixtral"), small_config())
    _, events = train(model, steps=12)
    assert [e.step for e in events] == list(model.schedule.events)
    ranks = model.rank_map()
    assert ranks.shape == (2, 8)
    assert (ranks.sum(-1) == 8 * 4).all()
    assert ranks.min() >= 2 and ranks.max() <= 8


@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_bf16_forward_backward(family, adapter_dtype):
    base = tiny_moe(family, dtype=torch.bfloat16)
    x = token_batch()
    reference = logits(base, x)
    model = get_dr_lora_model(base, small_config(adapter_dtype=adapter_dtype))
    stored = torch.float32 if adapter_dtype == "float32" else torch.bfloat16
    assert all(lora.lora_A.dtype == lora.lora_B.dtype == stored for lora in model.expert_loras())
    assert all(p.dtype == stored for p in model.moe_layers[0].router.parameters())
    assert torch.equal(logits(model, x), reference)
    train(model, steps=4)
    assert torch.isfinite(logits(model, x)).all()
    assert (model.rank_map().sum(-1) <= 8 * 4).all()


def _step_tokens(model):
    return [float(a.frequency.step_tokens) for a in model.adapters]


@pytest.mark.parametrize("reentrant", [False, True])
def test_routing_counted_once_per_training_forward_not_in_eval_or_recompute(reentrant):
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    x = token_batch()
    logits(model, x)  # eval forward: not counted
    assert _step_tokens(model) == [0.0, 0.0]
    model.train()
    model(x, labels=x).loss.backward()
    plain = _step_tokens(model)
    assert plain == [float(x.numel())] * 2
    for a in model.adapters:
        a.frequency.step_tokens.zero_()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(x, labels=x).loss.backward()
    assert _step_tokens(model) == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_frequency_uses_the_weights_experts_receive(family):
    model = get_dr_lora_model(tiny_moe(family), small_config())
    seen = {}
    experts = model.moe_layers[0].experts
    handle = experts.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    model.train()
    x = token_batch()
    model(x, labels=x)
    handle.remove()
    _, index, weights = seen["args"]
    expected = torch.zeros(8).index_add_(0, index.reshape(-1), weights.reshape(-1).float())
    torch.testing.assert_close(model.adapters[0].frequency.step_mass, expected)


def _reference_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The textbook definition the grouped fast path must reproduce: a loop over experts, each applying
    W + s · B diag(m) A as dense matrices to the tokens routed to it."""
    loras, slices = self.dr_lora.projections, self.dr_lora.slices

    def linear(x, weight, e, name):  # weight [E, out, in] (or [E, in, out] when transposed) of expert e, plus LoRA
        y = x @ (weight[e] if self.is_transposed else weight[e].T)
        if name == "down" and "down" in loras:
            y = y + x @ _delta(loras["down"], e).T
        for proj in ("gate", "up"):
            if name == "gate_up" and proj in loras:
                y = y.clone()
                y[:, slices[proj]] += x @ _delta(loras[proj], e).T
        return y

    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        token, choice = torch.where(top_k_index == e)
        x = hidden_states[token]
        proj = linear(x, self.gate_up_proj if self.has_gate else self.up_proj, e, "gate_up")
        if self.has_bias:
            proj = proj + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[e]
        hidden = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)
        down = linear(hidden, self.down_proj, e, "down")
        if self.has_bias:
            down = down + self.down_proj_bias[e]
        out = out.index_add(0, token, down * top_k_weights[token, choice, None])
    return out


def _delta(lora, e):
    return lora.scaling * (lora.lora_B[e] * lora.rank_mask[e]) @ lora.lora_A[e]


def _loss_and_grads(model, x):
    for p in model.parameters():
        p.grad = None
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_a_per_expert_reference_in_output_gradients_and_importance(family):
    # r_max 16 with ranks 4..8 of it: the fast path runs over a sliced active width, ranks differ per expert
    model = get_dr_lora_model(tiny_moe(family), small_config(target_projections=("gate", "up", "down"), r_init=4,
                                                              r_target=6, r_max=16, total_steps=10, warmup_ratio=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in model.expert_loras():
            lora.grow(torch.arange(lora.num_experts) % 5)
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=generator) * 0.1)  # masked ranks too
    model.update_and_allocate(0)  # out of warmup: the router learns, so its gradient is compared as well
    x = token_batch()
    loss, grads = _loss_and_grads(model, x)
    step_sums = [lora.importance.step_sum.clone() for lora in model.expert_loras()]
    assert any("router" in n or "gate.weight" in n for n in grads)  # the router's gradient is compared too

    for layer in model.moe_layers:
        layer.experts.forward = types.MethodType(_reference_experts_forward, layer.experts)
    ref_loss, ref_grads = _loss_and_grads(model, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for lora, step_sum in zip(model.expert_loras(), step_sums):
        # A-side Σ (∂L/∂A ⊙ A) over each rank's A row and B-side over its B column: one number (signals.py)
        a_side = (lora.lora_A.grad * lora.lora_A).sum(-1)
        torch.testing.assert_close(step_sum, a_side, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(step_sum, (lora.lora_B.grad * lora.lora_B).sum(-2), rtol=1e-4, atol=1e-7)
        assert step_sum.abs().sum() > 0


def test_dropout_mask_drops_at_the_configured_rate_in_every_bit_lane():
    torch.manual_seed(0)
    keep = dropout_keep_mask((999, 1000), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (999, 1000)
    drop = 1.0 - keep.float()
    assert abs(float(drop.mean()) - 0.1) < 0.002
    lanes = drop.reshape(-1, 3).mean(0)  # the 3 elements drawn from one 64-bit word are each unbiased
    assert (lanes - 0.1).abs().max() < 0.003
    torch.manual_seed(0)
    assert torch.equal(dropout_keep_mask((999, 1000), 0.1, torch.device("cpu")), keep)  # seeded like torch


def test_lora_dropout_forward_and_gradients_match_a_reference_with_the_same_mask(monkeypatch):
    import drlora.layer as layer

    torch.manual_seed(0)
    num_experts, features_in, features_out, p = 4, 16, 8, 0.5
    lora = layer.ExpertLoRA(num_experts, features_in, features_out, r_max=8, r_init=4, scaling=2.0, dropout=p,
                            seed=0, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        lora.lora_B.normal_()
    routed = layer.route(torch.randint(0, num_experts, (10, 2)), num_experts)
    x = torch.randn(20, features_in, requires_grad=True)
    base = torch.randn(20, features_out, requires_grad=True)
    grad_out = torch.randn(20, features_out)
    masks = []
    real = layer.dropout_keep_mask
    monkeypatch.setattr(layer, "dropout_keep_mask", lambda *a: masks.append(real(*a)) or masks[-1])
    lora.train()
    (lora.add_to(base * 1.0, x, routed) * grad_out).sum().backward()
    grads = [t.grad.clone() for t in (x, base, lora.lora_A, lora.lora_B)]
    for t in (x, base, lora.lora_A, lora.lora_B):
        t.grad = None

    dropped = x * masks[0] / (1 - p)
    delta = torch.stack([_delta(lora, e) for e in range(num_experts)])  # [E, out, in]
    reference = base + torch.einsum("noi,ni->no", delta[routed.expert_ids], dropped)
    (reference * grad_out).sum().backward()
    for got, want in zip(grads, (x.grad, base.grad, lora.lora_A.grad, lora.lora_B.grad)):
        torch.testing.assert_close(got, want)
    assert 0 < int((~masks[0]).sum()) < masks[0].numel()
    lora.eval()  # no dropout outside training
    masks.clear()
    with torch.no_grad():
        lora.add_to(base.detach().clone(), x.detach(), routed)
    assert masks == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_dropout_and_gradients(reentrant):
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(lora_dropout=0.3))
    with torch.no_grad():
        for lora in model.expert_loras():
            lora.lora_B.normal_(0, 0.1)
    x = token_batch()

    def grads():
        torch.manual_seed(7)
        _, result = _loss_and_grads(model, x)
        return result

    plain = grads()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    torch.manual_seed(8)  # a different dropout draw does change the gradients: the comparison above is not vacuous
    _, other = _loss_and_grads(model, x)
    assert any(not torch.allclose(other[n], plain[n]) for n in plain if "lora_A" in n)


def test_ranks_grown_past_the_cached_width_learn_at_once():
    # fp32 width is a multiple of 4: r_init 4 runs 4 wide; growing to 7 must widen the next forward to 8
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(r_init=4, r_target=6, r_max=16))
    x = token_batch()
    _loss_and_grads(model, x)  # caches the 4-wide rank scale
    for lora in model.expert_loras():
        lora.grow(torch.full((lora.num_experts,), 3))
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.1).mul_(lora.rank_mask.unsqueeze(1))
    _, grads = _loss_and_grads(model, x)
    for lora in model.expert_loras():
        assert lora.rank_scale().shape[1] == 8
        assert lora.lora_A.grad[:, 4:7].abs().sum() > 0 and lora.lora_B.grad[:, :, 4:7].abs().sum() > 0
        assert lora.lora_A.grad[:, 7:].abs().max() == 0 and lora.lora_B.grad[:, :, 7:].abs().max() == 0


def test_per_expert_fallback_gives_the_grouped_matmuls_results(monkeypatch):
    # the loop that runs where grouped_mm cannot (CUDA in fp32, misaligned shapes) must train like the kernel
    import drlora.grouped as grouped

    model = get_dr_lora_model(tiny_moe("gpt_oss"), small_config(target_projections=("gate", "up", "down"),
                                                                 lora_dropout=0.2))
    with torch.no_grad():
        for lora in model.expert_loras():
            lora.lora_B.normal_(0, 0.1)
    x = token_batch()
    torch.manual_seed(3)
    loss, grads = _loss_and_grads(model, x)
    monkeypatch.setattr(grouped, "grouped_mm_usable", lambda a, b: False)
    monkeypatch.setattr(grouped.mkl_batch, "enabled", False)  # the loop against the batched kernel the model used
    torch.manual_seed(3)
    fallback_loss, fallback_grads = _loss_and_grads(model, x)
    torch.testing.assert_close(fallback_loss, loss)
    assert fallback_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fallback_grads[name], grads[name], msg=name)


@pytest.mark.parametrize("overrides, message", [
    (dict(r_max=32), r"r_max=32 exceeds the up projection of the experts in model.layers.0.mlp.experts \(32 in, "
                     r"16 out\).*choose r_max <= 16"),
    (dict(r_max=8, extra_target_modules=("q_proj",), extra_r=40), r"extra_r=40 exceeds model.layers.0.self_attn.q_proj "
                                                                   r"\(32 in, 32 out\).*choose extra_r <= 32"),
])
def test_ranks_above_a_projections_width_are_refused_naming_the_widths(overrides, message):
    base = tiny_moe("olmoe")  # hidden 32, expert width 16
    with pytest.raises(ValueError, match=message):
        get_dr_lora_model(base, small_config(**overrides))
