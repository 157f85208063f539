"""The decode benchmark's pure parts: stream timings, /metrics counters, summaries and targets.

    tokens_in_chunk(chunk)                     # generated tokens of one stream chunk (parsed JSON)
    arrivals = [Arrival(t, tokens), ...]       # one per streamed chunk that carried tokens
    inter_token_gaps(arrivals)                 # -> seconds between tokens, the first (TTFT) left out
    StreamTiming(sent_s, arrivals).median_gap_s
    DecodeCounters.from_metrics(text)          # /metrics -> summed agent decode counters (or None)
    activity(text)                             # /metrics -> what changes while agents still work
    decoded_tokens(rounds)                     # -> tokens the agents' decode steps made for them
    counters_settled(before, now, expected, unchanged_s)  # -> whether a scrape holds every step
    round_trips_per_token(before, after)       # -> float, or None when a counter is missing
    round_trips_per_token_over([(before, after), ...])  # the same, summed over interleaved rounds
    summarize(case, agents, streams, rounds)   # -> one case's JSON-ready figures
    targets(data)                              # -> [Target(name, measured, met)]

No clocks, sockets or processes here: `server.bench_decode` measures, these functions judge.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

ROUND_TRIPS = "potluck_agent_decode_round_trips_total"  # synchronous waits on peers within decode steps
TOKENS = "potluck_agent_decode_tokens_total"  # tokens decoded by home agents
STEPS = "potluck_agent_decode_steps_total"  # decode steps: one scheduler <-> home round trip each
# The server refreshes agent counters every 2 s (and soon after a request ends, asynchronously):
# scrapes that agree for longer than that span a refresh that changed nothing.
COUNTERS_UNCHANGED_S = 2.5


@dataclass(frozen=True)
class Arrival:
    """One streamed chunk that carried generated tokens."""

    at_s: float  # perf_counter seconds when the chunk arrived
    tokens: int  # generated tokens it carried (>= 1)


@dataclass(frozen=True)
class StreamTiming:
    """One streamed request, as the client saw it."""

    sent_s: float  # perf_counter seconds when the request was sent
    arrivals: tuple[Arrival, ...]
    finish_reason: str | None = None  # the server's: "stop" (end-of-sequence token), "length" (max_tokens)

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.arrivals)

    @property
    def gaps_s(self) -> list[float]:
        return inter_token_gaps(self.arrivals)

    @property
    def median_gap_s(self) -> float | None:
        gaps = self.gaps_s
        return statistics.median(gaps) if gaps else None

    @property
    def first_token_s(self) -> float | None:
        """Seconds from the request sent to its first token (None: no token came)."""
        return self.arrivals[0].at_s - self.sent_s if self.arrivals else None

    @property
    def last_s(self) -> float:
        return self.arrivals[-1].at_s if self.arrivals else self.sent_s


def inter_token_gaps(arrivals: Sequence[Arrival]) -> list[float]:
    """Seconds between consecutive tokens. The first chunk's arrival is the TTFT and has no gap; a
    later chunk that carried k tokens (the server held one back, e.g. part of a character) spreads
    its gap over them: k gaps of gap / k. Tokens that came with the first chunk have no gap."""
    gaps: list[float] = []
    for prev, cur in zip(arrivals, arrivals[1:]):
        gaps += [(cur.at_s - prev.at_s) / cur.tokens] * cur.tokens
    return gaps


def tokens_in_chunk(chunk: dict[str, Any]) -> int:
    """Generated tokens one /v1/completions stream chunk carries. The bench asks for `logprobs: 0`,
    so each chunk lists its tokens (a token with no text of its own yet rides with a later chunk);
    without logprobs, a chunk with text counts as one. The finish and usage chunks carry none."""
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    logprobs = choices[0].get("logprobs")
    if logprobs is not None:
        return len(logprobs.get("tokens") or [])
    return 1 if choices[0].get("text") else 0


def aggregate_tokens_per_s(streams: Sequence[StreamTiming]) -> float | None:
    """Tokens all streams received / wall time from the first request sent to the last token."""
    tokens = sum(s.tokens for s in streams)
    wall = max(s.last_s for s in streams) - min(s.sent_s for s in streams) if streams else 0.0
    return tokens / wall if tokens and wall > 0 else None


def median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def metric_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text exposition -> {sample name: {sorted labels: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def summed(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float | None:
    """A metric summed over its label sets (e.g. over agents); None if the server does not export it."""
    return sum(samples[name].values()) if name in samples else None


def activity(text: str) -> tuple[float | None, ...]:
    """What changes while a cluster still works between requests (fills reading experts into free
    memory, a request running): equal in two scrapes a moment apart means it has settled."""
    s = metric_samples(text)
    return (summed(s, "potluck_agent_disk_read_bytes_total"), summed(s, "potluck_agent_expert_cache_bytes"),
            summed(s, "potluck_requests_running"))


@dataclass(frozen=True)
class DecodeCounters:
    """The agents' decode counters, summed over agents; None where /metrics lacks one."""

    round_trips: float | None
    tokens: float | None
    steps: float | None

    @classmethod
    def from_metrics(cls, text: str) -> DecodeCounters:
        s = metric_samples(text)
        return cls(summed(s, ROUND_TRIPS), summed(s, TOKENS), summed(s, STEPS))


def decoded_tokens(rounds: Sequence[Sequence[StreamTiming]]) -> int:
    """Tokens the agents' decode steps produced for these streams: every token the bench received
    but each request's first, which its prefill produced."""
    return sum(max(s.tokens - 1, 0) for r in rounds for s in r)


def counters_settled(before: DecodeCounters | None, now: DecodeCounters, expected_tokens: int | None,
                     unchanged_s: float) -> bool:
    """Whether a scrape taken after the timed requests holds all their decode steps: the agents'
    decoded tokens since `before` are the `expected_tokens`, or the counters have not changed for
    `unchanged_s` seconds (longer than the server's refresh: e.g. a build that counts differently).
    A server without the counters has nothing to wait for."""
    if now.tokens is None:
        return True
    if expected_tokens is not None and before is not None and before.tokens is not None:
        if now.tokens - before.tokens == expected_tokens:
            return True
    return unchanged_s >= COUNTERS_UNCHANGED_S


def round_trips_per_token(before: DecodeCounters | None, after: DecodeCounters | None) -> float | None:
    """(round trips + steps) / tokens between two scrapes: a step is one scheduler <-> home round
    trip, the rest wait on peers. None when a scrape is missing (its counters never settled), a
    counter is missing or no token was counted (a build whose decode does not run on a home agent)."""
    return round_trips_per_token_over([(before, after)])


def round_trips_per_token_over(spans: Sequence[tuple[DecodeCounters | None, DecodeCounters | None]]) -> float | None:
    """`round_trips_per_token` over several (before, after) pairs of scrapes, summed: a case whose
    rounds ran between other cases' rounds. None where any pair would give none for a missing
    scrape or counter."""
    trips = tokens = steps = 0.0
    for before, after in spans:
        if (spent := _spent(before, after)) is None:
            return None
        trips, tokens, steps = trips + spent[0], tokens + spent[1], steps + spent[2]
    if not tokens:
        return None
    return (trips + steps) / tokens


def _spent(before: DecodeCounters | None, after: DecodeCounters | None) -> tuple[float, float, float] | None:
    """(round trips, tokens, steps) counted between two scrapes; None where either lacks one."""
    if before is None or after is None:
        return None
    t0, n0, s0 = before.round_trips, before.tokens, before.steps
    t1, n1, s1 = after.round_trips, after.tokens, after.steps
    if t0 is None or n0 is None or s0 is None or t1 is None or n1 is None or s1 is None:
        return None
    return t1 - t0, n1 - n0, s1 - s0


def summarize(case: str, agents: int, streams: int, rounds: Sequence[Sequence[StreamTiming]],
              trips_per_token: float | None = None) -> dict[str, Any]:
    """One case's figures over its rounds (each a list of concurrent streams): the median over
    rounds of the streams' median gap, each stream's median gap over rounds, the median aggregate
    tokens/s, the median over rounds of the last stream's first token (the aggregate counts from
    the requests sent, so it counts the prompts' prefill), and what every round measured."""
    per_round = [median_or_none([s.median_gap_s for s in r]) for r in rounds]
    first = [max((t for s in r if (t := s.first_token_s) is not None), default=None) for r in rounds]
    return {
        "case": case, "agents": agents, "streams": streams,
        "median_itl_s": median_or_none(per_round),
        "stream_itl_s": [median_or_none([r[j].median_gap_s for r in rounds]) for j in range(streams)],
        "min_tokens": min((s.tokens for r in rounds for s in r), default=0),
        "stopped": sum(s.finish_reason == "stop" for r in rounds for s in r),  # streams an EOS token ended
        "aggregate_tokens_per_s": median_or_none([aggregate_tokens_per_s(r) for r in rounds]),
        "first_token_s": median_or_none(first),
        "round_trips_per_token": trips_per_token,
        "rounds": [{"median_itl_s": m, "aggregate_tokens_per_s": aggregate_tokens_per_s(r), "first_token_s": f,
                    "tokens": [s.tokens for s in r], "finish_reasons": [s.finish_reason for s in r],
                    "gaps_s": [s.gaps_s for s in r]}
                   for m, f, r in zip(per_round, first, rounds)],
    }  # fmt: skip


class Target(NamedTuple):
    """A tuple, as the prefill report's targets, so that `bench_report.target_lines` prints both."""

    name: str
    measured: str  # "n/a" when a figure it needs is missing
    met: bool | None  # None: not measurable in this run


def find(cases: Sequence[dict[str, Any]], case: str, agents: int | None = None,
         streams: int | None = None) -> dict[str, Any] | None:
    return next((c for c in cases if c["case"] == case and agents in (None, c["agents"])
                 and streams in (None, c["streams"])), None)  # fmt: skip


def lan_bound_s(data: dict[str, Any]) -> float | None:
    """One agent's compute per token (the 1-agent compute-bound median, on a LAN agent's threads)
    + one round trip (twice the one-way latency) per MoE layer."""
    one = find(data["cases"], "lan-compute", 1) or find(data["cases"], "compute", 1)
    if one is None or one["median_itl_s"] is None:
        return None
    return float(one["median_itl_s"]) + data["moe_layers"] * 2 * data["link_latency_s"]


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or a[key] is None or not b[key]:
        return None
    return float(a[key]) / float(b[key])


def _check(name: str, value: float | None, limit: float, at_most: bool, fmt: str = "{:.2f}x") -> Target:
    if value is None:
        return Target(name, "n/a", None)
    return Target(name, fmt.format(value), value <= limit if at_most else value >= limit)


def targets(data: dict[str, Any]) -> list[Target]:
    """The issue's targets, each only where this run measured the cases it compares."""
    cases, rows = data["cases"], []
    one, tf = find(cases, "compute", 1), find(cases, "transformers")
    if one and tf:
        rows.append(_check("1 agent <= 1.0x transformers", _ratio(one, tf, "median_itl_s"), 1.0, True))
    four = find(cases, "compute", 4)
    if one and four:
        rows.append(_check("4 agents <= 1.5x 1 agent", _ratio(four, one, "median_itl_s"), 1.5, True))
    lan = find(cases, "lan")
    if lan:
        bound = lan_bound_s(data)
        ratio = lan["median_itl_s"] / bound if bound and lan["median_itl_s"] is not None else None
        rows.append(_check("LAN <= 1.2x bound", ratio, 1.2, True))
        limit = data["moe_layers"] + 2
        rows.append(_check(f"LAN <= {limit} round trips per token (MoE layers + 2)", lan["round_trips_per_token"],
                           limit, True, "{:.1f}"))
    base = find(cases, "streams", streams=1)
    for k, factor in ((4, 2.5), (8, 3.5)):
        more = find(cases, "streams", streams=k)
        if base and more:
            rows.append(_check(f"{k} streams >= {factor}x the tokens/s of 1", _ratio(more, base, "aggregate_tokens_per_s"),
                               factor, False))
    from server.bench_decode_io import IO_FULL, IO_WITHOUT  # (which imports this module)

    full = find(cases, f"io-{IO_FULL}", 4)  # 2 agents are reported, without a target
    if full and (whole := find(cases, "io-whole", 4)):
        rows.append(_check("I/O-bound, 4 agents: split + load balance + prefetch >= 2.4x faster per token than "
                           "whole experts", _ratio(whole, full, "median_itl_s"), 2.4, False))
    for off, name in IO_WITHOUT.items():
        if full and (alone := find(cases, f"io-{name}", 4)):  # one of the three switched off: measurably slower
            rows.append(_check(f"I/O-bound, 4 agents: without {off} >= 1.05x slower", _ratio(alone, full, "median_itl_s"),
                               1.05, False))
    return rows
