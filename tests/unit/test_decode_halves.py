"""A big decode step's two halves (`decode_batch.halves`): whole spans, the cut nearest half the
rows, rows and positions carried over, and no split where it would not pay."""

from __future__ import annotations

from typing import Any

import torch

from node_agent import decode_batch
from node_agent.decode_batch import DecodeBatch, halves
from protos.ids import RequestId
from protos.messages import DecodeSpan


def batch_of(lengths: list[int]) -> DecodeBatch:
    """A batch of spans of these lengths, span i at position 10 * i, tokens numbered by row."""
    spans, starts, row = [], [], 0
    for i, n in enumerate(lengths):
        spans.append(DecodeSpan(request_id=RequestId(f"r{i}"), token_ids=tuple(range(row, row + n)), position=10 * i))
        starts.append(row)
        row += n
    caches: tuple[Any, ...] = tuple(f"cache{i}" for i in range(len(lengths)))  # `halves` only carries them
    return DecodeBatch(tuple(spans), torch.arange(row), torch.cat([torch.arange(s.position, s.end) for s in spans]),
                       caches, tuple(starts))


def test_the_cut_falls_between_spans_nearest_half_the_rows() -> None:
    batch = batch_of([128, 128, 128, 128])
    parts = halves(batch)
    assert parts is not None
    first, second = parts
    assert [s.request_id for s in first.spans] == ["r0", "r1"] and [s.request_id for s in second.spans] == ["r2", "r3"]
    assert (first.offset, second.offset) == (0, 256)
    assert first.starts == (0, 128) and second.starts == (0, 128)
    assert torch.equal(torch.cat([first.token_ids, second.token_ids]), batch.token_ids)
    assert torch.equal(torch.cat([first.positions, second.positions]), batch.positions)
    assert second.caches == ("cache2", "cache3")
    parts = halves(batch_of([300, 100, 100]))  # 300 | 200 is nearer half than 400 | 100
    assert parts is not None and [len(p.token_ids) for p in parts] == [300, 200]


def test_a_part_of_a_part_keeps_its_row_in_the_step() -> None:
    batch = batch_of([64, 64, 64, 64])
    inner = batch.part(1, 4).part(1, 3)
    assert inner.offset == 128 and [s.request_id for s in inner.spans] == ["r2", "r3"]
    assert torch.equal(inner.token_ids, batch.token_ids[128:256])


def test_no_halves_for_few_rows_one_span_or_no_fair_cut(monkeypatch: Any) -> None:
    assert decode_batch.PIPELINE_ROWS == 256
    assert halves(batch_of([100, 100])) is None  # fewer rows than PIPELINE_ROWS
    assert halves(batch_of([512])) is None  # one span: its rows cannot be cut here
    assert halves(batch_of([400, 1, 1, 1])) is None  # the best cut leaves a half under a quarter
    assert halves(batch_of([1] * 8 + [400])) is None
    assert halves(batch_of([128, 128])) is not None
    monkeypatch.setattr(decode_batch, "PIPELINE_ROWS", 8)
    assert halves(batch_of([4, 4])) is not None
