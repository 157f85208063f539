"""The home's K/V cache: the pace of a prompt's K/V moving in, and the split-KV choice."""

from __future__ import annotations

import time
from pathlib import Path

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
    start = time.monotonic()
    cache.pulled_at = start - 0.2  # the pull began 0.2 s ago
    cache.pulled_layer(0)
    first = cache.arrival_s(1)
    later = cache.arrival_s(2)
    # The cache reads the clock at each call: a busy host may hold the test between two calls for
    # any time up to `took`, which the bounds allow for instead of guessing a tolerance.
    took, eps = time.monotonic() - start, 1e-9  # eps: rounding of monotonic times
    assert cache.layer_s is not None and 0.2 - eps <= cache.layer_s <= 0.2 + took + eps
    # The next layer, one pace after the last came in, less the time since; the one after, a pace later.
    assert first is not None and cache.layer_s - took - eps <= first <= cache.layer_s + eps
    assert later is not None and cache.layer_s - took - eps <= later - first <= cache.layer_s + eps
    assert cache.arrival_s(0) == 0.0
