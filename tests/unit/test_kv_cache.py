"""The home's K/V cache: the pace of a prompt's K/V moving in, and the split-KV choice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from node_agent.kv_cache import KVCache, attend_where_it_is
from node_agent.model.config import MoeConfig


def test_attend_where_it_is_when_the_layer_is_further_off_than_a_round_trip() -> None:
    assert attend_where_it_is(0.050, 0.003)
    assert not attend_where_it_is(0.002, 0.003)
    assert not attend_where_it_is(None, 0.003)  # no pace yet: wait for the first layer
    assert not attend_where_it_is(0.050, None)


def test_arrival_follows_the_pace_of_the_layers_pulled(qwen_tiny: Path) -> None:
    cache = KVCache.allocate(MoeConfig.load(qwen_tiny), capacity=16, prompt=8, dtype=torch.float32)
    assert cache.arrival_s(1) is None
    cache.pulled_at = time.monotonic() - 0.2  # the pull began 0.2 s ago
    cache.pulled_layer(0)
    assert cache.layer_s is not None and 0.19 < cache.layer_s < 0.5
    first = cache.arrival_s(1)
    assert first is not None and 0.1 < first <= cache.layer_s  # the next layer, one pace after the last
    later = cache.arrival_s(2)
    assert later is not None and later - first == pytest.approx(cache.layer_s, abs=0.01)
    assert cache.arrival_s(0) == 0.0
