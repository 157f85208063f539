"""Random-weight Mixture-of-Experts checkpoints in the exact Hugging Face layout.

`init_model` writes a folder that `transformers` loads as it is, offline, and that potluck's expert
store reads tensor by tensor, exactly as it would read a published Qwen3-MoE or Mixtral checkpoint:

    config.json                          complete Qwen3MoeConfig / MixtralConfig
    model.safetensors                    when shards == 1, or else
    model-0000k-of-0000N.safetensors     + model.safetensors.index.json {"metadata", "weight_map"}
    tokenizer.json                       byte-level BPE trained offline on corpus.txt
    tokenizer_config.json, special_tokens_map.json, generation_config.json

Experts are stored one tensor per expert per projection, with the published names
(`mlp.experts.{e}.{gate,up,down}_proj` for Qwen3-MoE, `block_sparse_moe.experts.{e}.w{1,2,3}` for
Mixtral); transformers >= 5 fuses them into `gate_up_proj` / `down_proj` only when it loads them.

How the pieces flow:

    ModelPreset --_tensor_plan--> [_TensorSpec] --_split_shards--> shards --_write_weights--> files
    corpus.txt --train_tokenizer--> Tokenizer --(special token ids)--> config.json, generation_config
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, MixtralConfig, Qwen3MoeConfig

from node_agent.model.synth_tokenizer import Arch, special_ids, train_tokenizer, write_json, write_tokenizer

DType = Literal["float32", "bfloat16"]

# A byte-level BPE needs its 256 byte symbols plus the 3 special tokens before any merge.
MIN_VOCAB_SIZE = 256 + 3

# Init scales, all relative to unit-RMS inputs (every matrix below reads an RMSNorm output or a
# unit-variance activation). Each matrix uses std = gain / sqrt(fan_in), so its output has RMS ~ gain.
_EMBED_STD = 1.0  # the residual stream starts at RMS 1, the same as each branch adds: tokens stay visible
# Router logits ~ N(0, 4^2): the top-k softmax weights are decisive (top-1 ~0.8 of 2, not ~0.5),
# and top-k margins are O(1) logits (bench: median 0.9, under 0.01 for ~0.7% of token-layers).
# Note: a larger gain cannot remove near-ties, since rounding error in the logits grows with it;
# the chance that float32 reordering flips a choice stays ~1e-5 per token-layer.
_ROUTER_GAIN = 4.0
_LM_HEAD_GAIN = 2.0  # logits ~ N(0, 2^2): a clear greedy argmax without a one-hot softmax
_NORM_NOISE = 0.1  # RMSNorm gains are 1 + N(0, 0.1^2): near 1, yet not trivially ones
# Topics (init_model's `topics`): a token of vocabulary range r carries direction u_r with this
# share of its embedding's norm, and the router rows of expert group r add u_r scaled so that it
# raises their logits by about TOPIC_LOGIT over the other groups' where the residual stream still
# carries it. The lm_head rows of range r add u_r the same way (by TOPIC_LOGIT too), so that the
# tokens a request generates stay in its prompt's range and keep choosing its experts: without
# it, random logits sent the generated text anywhere in the vocabulary (0-50% of it in the
# prompt's range on the many-expert placement model), and decode, the traffic placement is for,
# had no topic. Random weights have no topics of their own: this gives a benchmark users whose
# prompts and answers (drawn from and staying in their own range) keep choosing their own experts,
# as real workloads do.
TOPIC_EMBED = 3.0
TOPIC_LOGIT = 8.0
# Bumped whenever the topics change the weights (2: the lm_head rows); the placement benchmark
# keys its cached model on it.
TOPIC_VERSION = 2


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a synthetic checkpoint. Fields are counts unless a unit is given."""

    hidden_size: int  # residual width D
    layers: int  # decoder layers, all MoE (decoder_sparse_step = 1, mlp_only_layers = [])
    heads: int  # query heads; head_dim = hidden_size // heads
    kv_heads: int  # key/value heads; divides heads (both presets use GQA: fewer than heads)
    experts: int  # routed experts per layer E
    experts_per_token: int  # top-k
    intermediate_size: int  # expert width I (Qwen3 moe_intermediate_size, Mixtral intermediate_size)
    dense_intermediate_size: int  # Qwen3's dense-MLP width, only used by mlp_only_layers (kept empty)
    vocab_size: int  # embedding rows; >= the tokenizer's vocabulary (extra rows are padding)
    max_position_embeddings: int  # tokens
    shards: int  # safetensors files the weights are split into
    rope_theta: float = 1_000_000.0  # RoPE base, as Qwen3-MoE and Mixtral ship it
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "kv_heads", "experts", "experts_per_token",
                     "intermediate_size", "dense_intermediate_size", "max_position_embeddings", "shards"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by heads={self.heads}")
        if self.head_dim % 2:  # RoPE rotates pairs of dimensions
            raise ValueError(f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / heads="
                             f"{self.heads}) must be even for RoPE")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.experts < 2:
            raise ValueError(f"experts={self.experts} must be >= 2 for a mixture")
        if self.experts_per_token > self.experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} exceeds experts={self.experts}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size!r} is smaller than the {MIN_VOCAB_SIZE} "
                             "ids the byte-level tokenizer needs (256 bytes + 3 special tokens)")
        if not self.rope_theta > 0 or not 0 < self.rms_norm_eps < 1:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0 and "
                             f"rms_norm_eps={self.rms_norm_eps} in (0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


PRESETS: dict[str, ModelPreset] = {
    # Tests: many agents share a 2-core box, so a 64-token forward must take milliseconds. Still a
    # real MoE: GQA (4 heads over 2 KV heads), 8 experts top-2, and an expert width (32) unlike the
    # hidden size (64) so a transposed [I, H] / [H, I] tensor fails loudly. 3 layers over 2 shards
    # put a layer across a shard boundary, the path real checkpoints take.
    "tiny": ModelPreset(hidden_size=64, layers=3, heads=4, kv_heads=2, experts=8, experts_per_token=2,
                        intermediate_size=32, dense_intermediate_size=128, vocab_size=1024,
                        max_position_embeddings=2048, shards=2),
    # Benchmarks: a 2048-token prefill costs ~130 GFLOP, a few seconds on one CPU thread in float32
    # (transformers on the dev box: 2.4 s Qwen3-MoE, 3.3 s Mixtral), and experts are 94% of the
    # 0.64 GB of float32 weights, so an expert-streaming benchmark is I/O bound like the real
    # models. 8 size-balanced shards (~80 MB) cut layers at arbitrary points, as real 4-5 GB shards
    # do. corpus.txt trains up to ~4.6k tokens, so vocab 4096 needs no padding rows.
    "bench": ModelPreset(hidden_size=512, layers=8, heads=8, kv_heads=2, experts=16, experts_per_token=2,
                         intermediate_size=768, dense_intermediate_size=1536, vocab_size=4096,
                         max_position_embeddings=8192, shards=8),
}


@dataclass(frozen=True)
class _TensorSpec:
    """One checkpoint tensor and how to draw it: N(mean, std^2), float32, then cast."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    layer: int | None  # decoder layer it belongs to, for progress lines

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensor_plan(arch: Arch, p: ModelPreset) -> list[_TensorSpec]:
    """Every tensor of the checkpoint in forward order (embeddings, layer 0..L-1, norm, lm_head)."""
    D, I, E, hd = p.hidden_size, p.intermediate_size, p.experts, p.head_dim
    q_out, kv_out = p.heads * hd, p.kv_heads * hd

    def mat(name: str, out_f: int, in_f: int, layer: int | None, gain: float = 1.0) -> _TensorSpec:
        return _TensorSpec(name, (out_f, in_f), 0.0, gain / math.sqrt(in_f), layer)

    def norm(name: str, width: int, layer: int | None) -> _TensorSpec:
        return _TensorSpec(name, (width,), 1.0, _NORM_NOISE, layer)

    plan = [_TensorSpec("model.embed_tokens.weight", (p.vocab_size, D), 0.0, _EMBED_STD, None)]
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        plan += [
            norm(f"{pre}.input_layernorm.weight", D, i),
            mat(f"{pre}.self_attn.q_proj.weight", q_out, D, i),  # [heads*hd, D]
            mat(f"{pre}.self_attn.k_proj.weight", kv_out, D, i),  # [kv_heads*hd, D]
            mat(f"{pre}.self_attn.v_proj.weight", kv_out, D, i),
            mat(f"{pre}.self_attn.o_proj.weight", D, q_out, i),  # [D, heads*hd]
        ]
        if arch == "qwen3_moe":  # per-head RMSNorm on q and k, Qwen3 only
            plan += [norm(f"{pre}.self_attn.q_norm.weight", hd, i), norm(f"{pre}.self_attn.k_norm.weight", hd, i)]
        plan.append(norm(f"{pre}.post_attention_layernorm.weight", D, i))
        if arch == "qwen3_moe":
            moe, names = f"{pre}.mlp", ("gate_proj", "up_proj", "down_proj")
        else:  # Mixtral: w1 = gate, w3 = up, w2 = down
            moe, names = f"{pre}.block_sparse_moe", ("w1", "w3", "w2")
        plan.append(mat(f"{moe}.gate.weight", E, D, i, _ROUTER_GAIN))  # router [E, D]
        for e in range(E):
            gate, up, down = (f"{moe}.experts.{e}.{n}.weight" for n in names)
            plan += [mat(gate, I, D, i), mat(up, I, D, i), mat(down, D, I, i)]  # [I,D], [I,D], [D,I]
    plan += [norm("model.norm.weight", D, None), mat("lm_head.weight", p.vocab_size, D, None, _LM_HEAD_GAIN)]
    return plan


def _split_shards(plan: list[_TensorSpec], shards: int) -> list[list[_TensorSpec]]:
    """Cut `plan`, in order, into `shards` non-empty runs of about equal bytes."""
    groups: list[list[_TensorSpec]] = []
    start, remaining = 0, sum(s.numel for s in plan)
    for left in range(shards, 0, -1):  # shards still to fill, this one included
        if left == 1:
            groups.append(plan[start:])
            break
        target, end, size = remaining / left, start + 1, plan[start].numel
        # Take the next tensor while that keeps this shard nearer its target and leaves at least
        # one tensor for each later shard.
        while end < len(plan) - (left - 1) and size + plan[end].numel / 2 <= target:
            size, end = size + plan[end].numel, end + 1
        groups.append(plan[start:end])
        start, remaining = end, remaining - size
    return groups


def _draw(spec: _TensorSpec, seed: int, dtype: torch.dtype, topics: int = 0) -> torch.Tensor:
    # One generator per tensor, seeded from (seed, name): a tensor's values do not depend on the
    # shard count, the order of generation, or the shape of any other tensor.
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    t = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    t.mul_(spec.std).add_(spec.mean)
    topical = spec.name in ("model.embed_tokens.weight", "lm_head.weight") or spec.name.endswith(".gate.weight")
    if topics > 1 and topical:
        _add_topics(t, spec.name, topics, seed)
    return t.to(dtype)


def topic_ranges(vocab: int, topics: int) -> list[range]:
    """The token ids of each topic: contiguous, nearly equal ranges of the vocabulary."""
    return [range(vocab * r // topics, vocab * (r + 1) // topics) for r in range(topics)]


def topic_groups(experts: int, topics: int) -> list[range]:
    """The experts each topic's tokens prefer, in every MoE layer: contiguous, nearly equal groups."""
    return [range(experts * r // topics, experts * (r + 1) // topics) for r in range(topics)]


def _add_topics(t: torch.Tensor, name: str, topics: int, seed: int) -> None:
    """In place: each topic's direction on its tokens' embedding rows [V, D] or lm_head rows
    [V, D], or on its expert group's router rows [E, D]."""
    D = t.shape[1]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + topics)
    directions, _ = torch.linalg.qr(torch.randn(D, topics, generator=gen))  # [D, topics], orthonormal
    embedding = name == "model.embed_tokens.weight"
    by_token = embedding or name == "lm_head.weight"
    parts = topic_ranges(t.shape[0], topics) if by_token else topic_groups(t.shape[0], topics)
    # The RMSNormed residual stream has norm sqrt(D), of which a topic keeps about a share of
    # TOPIC_EMBED / sqrt(1 + TOPIC_EMBED^2) along its direction.
    share = TOPIC_EMBED / math.sqrt(1 + TOPIC_EMBED**2)
    scale = TOPIC_EMBED * _EMBED_STD * math.sqrt(D) if embedding else TOPIC_LOGIT / (share * math.sqrt(D))
    for r, rows in enumerate(parts):
        t[rows.start:rows.stop] += scale * directions[:, r]


def _write_weights(
    folder: Path, plan: list[_TensorSpec], shards: int, seed: int, dtype: torch.dtype,
    progress: Callable[[str], None], topics: int = 0,
) -> None:
    """Write the safetensors file(s), and the index when sharded. Holds one shard in memory."""
    groups = _split_shards(plan, shards)
    weight_map: dict[str, str] = {}
    total_bytes, layers_seen = 0, -1
    n_layers = 1 + max(s.layer for s in plan if s.layer is not None)
    for k, group in enumerate(groups, start=1):
        fname = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for spec in group:
            if spec.layer is not None and spec.layer > layers_seen:
                layers_seen = spec.layer
                progress(f"layer {spec.layer + 1}/{n_layers}: drawing into {fname}")
            tensors[spec.name] = _draw(spec, seed, dtype, topics)
            weight_map[spec.name] = fname
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total_bytes += shard_bytes
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        (folder / fname).chmod(0o644)  # safetensors creates it owner-only, unlike the JSON files
        progress(f"wrote {fname} ({len(tensors)} tensors, {shard_bytes / 1e6:.1f} MB)")
        del tensors
    if shards > 1:  # the same two keys save_pretrained writes; weight_map sorted by name as it does
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(folder / "model.safetensors.index.json", index)


def _model_config(arch: Arch, p: ModelPreset, dtype: DType, ids: dict[str, int]) -> dict[str, object]:
    """config.json as transformers writes it, readable by transformers 4.x and 5.x."""
    rope = {"rope_type": "default", "rope_theta": p.rope_theta}
    common: dict[str, object] = dict(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, head_dim=p.head_dim,
        hidden_act="silu", max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=False, num_experts_per_tok=p.experts_per_token,
        sliding_window=None, output_router_logits=False, dtype=dtype,
    )
    cfg: Qwen3MoeConfig | MixtralConfig
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common, architectures=["Qwen3MoeForCausalLM"], num_experts=p.experts,  # type: ignore[arg-type]
            moe_intermediate_size=p.intermediate_size, intermediate_size=p.dense_intermediate_size,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
            attention_bias=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        )
    else:
        cfg = MixtralConfig(
            **common, architectures=["MixtralForCausalLM"], num_local_experts=p.experts,  # type: ignore[arg-type]
            intermediate_size=p.intermediate_size, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
        )
    # The same keys save_pretrained writes (fields that differ from the PreTrainedConfig base).
    out: dict[str, object] = json.loads(cfg.to_json_string())
    if arch == "qwen3_moe":
        # transformers 5 aliases num_experts -> num_local_experts and writes the alias; published
        # Qwen3-MoE configs, and transformers 4.x, use num_experts (4.x would default to 128).
        out["num_experts"] = out.pop("num_local_experts")
    out["rope_theta"] = p.rope_theta  # transformers 4.x reads the flat key, 5.x rope_parameters
    out["torch_dtype"] = dtype  # 4.x name of `dtype`
    return out


def _write_generation_config(folder: Path, arch: Arch, ids: dict[str, int]) -> None:
    if arch == "qwen3_moe":  # a chat turn ends at <|im_end|>, raw text at <|endoftext|>
        eos: int | list[int] = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        gen = GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=eos,
                               pad_token_id=ids["<|endoftext|>"], do_sample=False)
    else:
        gen = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], do_sample=False)
    gen.save_pretrained(folder)


def init_model(
    arch: Literal["qwen3_moe", "mixtral"],
    out: Path,
    preset: Literal["tiny", "bench"] = "tiny",
    *,
    hidden_size: int | None = None,
    layers: int | None = None,
    experts: int | None = None,
    experts_per_token: int | None = None,
    intermediate_size: int | None = None,  # expert width: Qwen3-MoE's moe_intermediate_size, Mixtral's intermediate_size
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: Literal["float32", "bfloat16"] = "float32",
    shards: int | None = None,  # number of safetensors shards; None = preset default
    progress: Callable[[str], None] | None = None,  # called with human-readable progress lines
    topics: int = 0,  # > 1: routers biased by token range (topic_ranges -> topic_groups); 0: none
) -> Path:
    """Write a random-weight `arch` checkpoint of `preset` shape (with overrides) into `out`.

    Deterministic in (arch, preset, overrides, seed, dtype, shards). Raises ValueError (quoting the
    value) for a bad argument, FileExistsError if `out` exists and is not an empty folder. The
    checkpoint is built in a sibling temporary folder and renamed into place, so an interrupted
    call leaves no half-written `out`. Returns `out`.
    """
    if arch not in get_args(Arch):
        raise ValueError(f"arch={arch!r} is not one of {get_args(Arch)}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    if dtype not in get_args(DType):
        raise ValueError(f"dtype={dtype!r} is not one of {get_args(DType)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if not isinstance(topics, int) or topics < 0 or topics == 1:
        raise ValueError(f"topics={topics!r} must be 0 (none) or at least 2")
    overrides = dict(hidden_size=hidden_size, layers=layers, experts=experts, vocab_size=vocab_size,
                     experts_per_token=experts_per_token, intermediate_size=intermediate_size, shards=shards)
    shape = dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    plan = _tensor_plan(arch, shape)
    if shape.shards > len(plan):
        raise ValueError(f"shards={shape.shards} exceeds the {len(plan)} tensors of this model")
    if topics > shape.experts:
        raise ValueError(f"topics={topics} exceeds the {shape.experts} experts of a layer (a group each)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; pick a new path or delete it")
    report = progress or (lambda line: None)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tok = train_tokenizer(arch, shape.vocab_size)
        ids = special_ids(arch, tok)
        report(f"trained tokenizer: {tok.get_vocab_size()} tokens for vocab_size={shape.vocab_size}")
        write_tokenizer(work, arch, tok, shape.max_position_embeddings)
        config = _model_config(arch, shape, dtype, ids)
        if topics:
            config["potluck_topics"] = topics  # documents the bias (the loaders ignore it)
            config["potluck_topics_version"] = TOPIC_VERSION
        write_json(work / "config.json", config)
        _write_generation_config(work, arch, ids)
        _write_weights(work, plan, shape.shards, seed, getattr(torch, dtype), report, topics)
        work.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(work, out)  # atomic; POSIX rename replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report(f"{arch} checkpoint ready in {out}")
    return out
