"""Q/K/V of a few rows from the stacked projection (`moe.STACKED_QKV_ROWS`) equal the three
projections' bit for bit, for both families, and the stacking keeps one copy of the weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from node_agent.model import moe
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from tests.conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_projection_gives_the_same_qkv(tiny_models: dict[str, Path], arch: str, dtype: torch.dtype) -> None:
    cfg = MoeConfig.load(tiny_models[arch])
    dense = moe.load_dense(Checkpoint(tiny_models[arch]), cfg, dtype)
    rope = moe.RopeTable(cfg.head_dim, cfg.rope_theta, dtype)
    g = torch.Generator().manual_seed(3)
    for w in dense.layers:
        assert w.qkv is not None and (w.qk_norm is not None) == cfg.qk_norm
        assert w.q.untyped_storage().data_ptr() == w.qkv.untyped_storage().data_ptr()  # views, not copies
        plain = dataclasses.replace(w, qkv=None, qk_norm=None)
        for rows in (1, 3, moe.STACKED_QKV_ROWS):
            h = torch.randn(rows, cfg.hidden_size, generator=g).to(dtype)
            cos, sin = rope.at(torch.arange(40, 40 + rows))
            with torch.inference_mode():
                stacked, separate = moe.qkv_at(w, cfg, h, cos, sin), moe.qkv_at(plain, cfg, h, cos, sin)
            for a, b in zip(stacked, separate):
                assert a.shape == b.shape and torch.equal(a, b), (rows, dtype)
