"""The whole model in one process with the project's own math: the single-device baseline.

Used by tests (to check the math against `transformers` independently of the distributed path)
and by the benchmark as potluck's 1-device reference. The distributed path calls the same
functions on shards.
"""

from __future__ import annotations

import torch

from node_agent.model import moe, slots
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig


class LocalModel:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = MoeConfig.load(model_dir)  # type: ignore[arg-type]
        self.ckpt = Checkpoint(model_dir)  # type: ignore[arg-type]
        self.dense = moe.load_dense(self.ckpt, self.cfg, dtype)
        self.dtype = dtype
        self._experts: dict[tuple[int, int], moe.ExpertWeights] = {}
        self.last_routed: set[tuple[int, int]] = set()  # (layer, expert) the last forward used
        self.last_token_routed: set[int] = set()  # experts of the last layer the final token used

    def expert(self, layer: int, index: int) -> moe.ExpertWeights:
        key = (layer, index)
        if key not in self._experts:
            names = self.cfg.expert_tensor_names(layer, index)
            self._experts[key] = moe.ExpertWeights(*(self.ckpt.read(n).to(self.dtype) for n in names))
        return self._experts[key]

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] (float32) of a whole sequence, no cache."""
        cfg = self.cfg
        pos = torch.arange(len(token_ids))
        h = self.dense.embed[torch.tensor(token_ids)]  # [T, D]
        self.last_routed = set()
        for i, w in enumerate(self.dense.layers):
            q, k, v = moe.qkv(w, cfg, h, pos)
            h = moe.attention_output(w, h, moe.attend(q, k, v, pos, pos)[0])
            x = moe.rms_norm(h, w.post_norm, cfg.rms_eps)
            if w.dense_mlp is not None:
                h = h + moe.swiglu(w.dense_mlp, x)
            else:
                ids, weights = moe.route(w, cfg, x)
                self.last_routed |= {(i, int(e)) for e in ids.unique().tolist()}
                self.last_token_routed = {int(e) for e in ids[-1].tolist()}
                h = h + slots.run_experts(x, ids, weights, lambda e, i=i: self.expert(i, e))  # type: ignore[misc]
        return moe.final_logits(self.dense, cfg, h)
