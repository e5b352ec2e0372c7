"""The upcycling conversion on a tiny random Llama: the MoE computes exactly the dense model."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from drlora.builtin.smollm2_moe import fit_routers, spherical_kmeans, upcycle


def tiny_llama():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def test_upcycled_moe_matches_dense_logits_at_any_top_k():
    dense = tiny_llama()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = dense(x).logits
    routers = [torch.randn(4, 32) for _ in range(2)]
    for top_k in (1, 2, 4):  # 4 = all experts
        moe = upcycle(dense, num_experts=4, top_k=top_k, routers=routers)
        assert type(moe).__name__ == "MixtralForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(moe(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_kmeans_routers_are_deterministic_and_separate_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    x = torch.cat([c + 0.1 * torch.randn(50, 16, generator=g) for c in centres])
    a = spherical_kmeans(x, 3, seed=1)
    assert torch.equal(a, spherical_kmeans(x, 3, seed=1))
    assign = (torch.nn.functional.normalize(x - x.mean(0), dim=-1) @ a.T).argmax(-1)
    assert all(len(set(assign[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(3))
    assert len(set(assign.tolist())) == 3
    routers = fit_routers([x], 3, seed=1, temperature=8.0)
    assert routers[0].shape == (3, 16)
