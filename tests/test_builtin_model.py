"""The upcycling conversion on a tiny random Llama: the MoE computes exactly the dense model."""

import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from drlora.builtin.smollm2_moe import fit_routers, moe_layer_indices, spherical_kmeans, upcycle
from drlora.layout import find_moe_layers


def tiny_llama():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def test_upcycled_moe_matches_dense_logits_at_any_top_k_and_layer_choice():
    dense = tiny_llama()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = dense(x).logits
    routers = {i: torch.randn(4, 32) for i in range(3)}
    for top_k in (1, 2, 4):  # 4 = all experts
        for moe_layers in ([0, 1, 2], [2], [1, 2]):
            moe = upcycle(dense, num_experts=4, top_k=top_k, routers=routers, moe_layers=moe_layers)
            assert type(moe).__name__ == "Qwen2MoeForCausalLM"
            assert [layer.name for layer in find_moe_layers(moe)] == [f"model.layers.{i}.mlp.experts"
                                                                      for i in moe_layers]
            with torch.no_grad():
                torch.testing.assert_close(moe(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_upcycled_moe_reloads_with_plain_transformers_in_a_fresh_process(tmp_path):
    dense = tiny_llama()
    moe = upcycle(dense, num_experts=4, top_k=2, routers={2: torch.randn(4, 32)}, moe_layers=[2])
    moe.save_pretrained(tmp_path)
    x = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.save({"x": x, "logits": dense(x).logits}, tmp_path / "expected.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
            "e = torch.load(sys.argv[1] + '/expected.pt'); "
            "torch.testing.assert_close(m(e['x']).logits, e['logits'], atol=1e-5, rtol=1e-5); print('ok')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_moe_layers_are_the_upper_ones():
    assert moe_layer_indices(30, 10) == list(range(20, 30))
    assert moe_layer_indices(4, 4) == [0, 1, 2, 3]


def test_kmeans_routers_are_deterministic_and_separate_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    x = torch.cat([c + 0.1 * torch.randn(50, 16, generator=g) for c in centres])
    a = spherical_kmeans(x, 3, seed=1)
    assert torch.equal(a, spherical_kmeans(x, 3, seed=1))
    assign = (torch.nn.functional.normalize(x - x.mean(0), dim=-1) @ a.T).argmax(-1)
    assert all(len(set(assign[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(3))
    assert len(set(assign.tolist())) == 3
    routers = fit_routers({5: x}, 3, seed=1, temperature=8.0)
    assert routers[5].shape == (3, 16)
