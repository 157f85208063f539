"""The model's shape, read from a Hugging Face `config.json` (Mixtral and Qwen3-MoE).

Both families share one decoder (pre-norm, RoPE + GQA attention, a top-k router over SwiGLU
experts); they differ only in the fields below (`qk_norm`, `norm_topk_prob`, tensor names), so one
config type and one math module serve both instead of two near-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class MoeConfig:
    model_type: str  # "mixtral" | "qwen3_moe"
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H query heads
    num_kv_heads: int  # KVH key/value heads (GQA: H % KVH == 0)
    head_dim: int  # per head
    num_experts: int  # E routed experts per MoE layer
    top_k: int  # experts per token
    expert_size: int  # I, the width of one expert's SwiGLU
    dense_size: int  # width of a dense MLP layer (Qwen3 mlp_only_layers)
    dense_layers: frozenset[int]  # layers with a dense MLP instead of experts
    vocab_size: int  # V
    rms_eps: float
    rope_theta: float
    max_positions: int  # context length
    qk_norm: bool  # Qwen3 normalises q and k per head
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    tie_embeddings: bool
    dtype: str  # checkpoint dtype, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} must be in 1..{self.num_experts}")

    def is_moe(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def has_experts(self, layer: int) -> bool:
        """Whether `layer` is a layer of this model with routed experts (a bound check on input)."""
        return 0 <= layer < self.num_layers and self.is_moe(layer)

    def prefix(self, layer: int) -> str:
        """Tensor-name prefix of a layer's MoE block."""
        block = "block_sparse_moe" if self.model_type == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}"

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one expert, as the published checkpoints spell them."""
        p = f"{self.prefix(layer)}.experts.{expert}"
        if self.model_type == "mixtral":
            return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> MoeConfig:
        model_type = cfg.get("model_type", "")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window", model_type == "mixtral") and window is not None and window < cfg["max_position_embeddings"]:
            raise ValueError(f"sliding_window {window} is not supported")
        if model_type == "mixtral":
            experts, expert_size, dense, dense_layers = cfg["num_local_experts"], cfg["intermediate_size"], 0, frozenset[int]()
            norm_topk = True  # Mixtral: softmax over the top-k logits
        else:
            # Published Qwen3 configs say num_experts; transformers 5 writes num_local_experts.
            experts = cfg.get("num_experts", cfg.get("num_local_experts"))
            expert_size = cfg["moe_intermediate_size"]
            dense = int(cfg.get("intermediate_size", 0))
            step = int(cfg.get("decoder_sparse_step", 1))
            only = set(cfg.get("mlp_only_layers") or [])
            n = int(cfg["num_hidden_layers"])
            dense_layers = frozenset(i for i in range(n) if i in only or experts == 0 or (i + 1) % step)
            norm_topk = bool(cfg.get("norm_topk_prob", False))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            num_experts=int(experts),
            top_k=int(cfg["num_experts_per_tok"]),
            expert_size=int(expert_size),
            dense_size=dense,
            dense_layers=dense_layers,
            vocab_size=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_positions=int(cfg["max_position_embeddings"]),
            qk_norm=model_type == "qwen3_moe",
            norm_topk_prob=norm_topk,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )

    @classmethod
    def load(cls, model_dir: Path) -> MoeConfig:
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --model must be a checkpoint folder")
        return cls.from_dict(json.loads(path.read_text()))
