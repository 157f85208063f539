"""Prometheus metrics of one server, in its own registry (never the process-global default).

Names follow Prometheus conventions: prefix `potluck_`, base units (seconds, bytes), `_total` on
counters. Request latencies are observed by `generation.Generation` as tokens flow; queue depths
and per-agent expert-cache counters are read from `engine.snapshot()` at scrape time by
`EngineCollector`, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.types import AgentSnapshot, EngineSnapshot
from server.version import potluck_version

# Seconds. From a few ms (a cached decode step on a fast box) to 10 min (a long prompt whose
# experts all stream from a slow disk).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0)

SnapshotSource = Callable[[], EngineSnapshot | None]  # None until the engine has started


class ServerMetrics:
    """Every metric the server exports; `render()` is the body of GET /metrics. Request metrics
    carry `model_name` (the served model id), as vLLM's do, so one dashboard serves several
    servers; the attributes are the children bound to it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, snapshot: SnapshotSource, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        registry, model = self.registry, {"model_name": model_name}

        def histogram(name: str, help_text: str) -> Histogram:
            return Histogram(name, help_text, ["model_name"], buckets=LATENCY_BUCKETS, registry=registry).labels(**model)

        def counter(name: str, help_text: str) -> Counter:
            return Counter(name, help_text, ["model_name"], registry=registry).labels(**model)

        self.time_to_first_token = histogram("potluck_time_to_first_token_seconds",
                                             "Time from submission to the first generated token.")
        self.inter_token_latency = histogram("potluck_inter_token_latency_seconds",
                                             "Time between consecutive generated tokens of a request.")
        self.e2e_request_latency = histogram("potluck_e2e_request_latency_seconds",
                                             "Time from submission to the last token of a request.")
        self.queue_time = histogram("potluck_request_queue_time_seconds",
                                    "Time a request waited in the queue before it started running.")
        self.prefill_time = histogram("potluck_request_prefill_time_seconds",
                                      "Time from a request's start of running to its first token.")
        self.decode_time = histogram("potluck_request_decode_time_seconds",
                                     "Time from a request's first token to its last.")
        self.prompt_tokens = counter("potluck_prompt_tokens", "Prompt tokens submitted.")
        self.generation_tokens = counter("potluck_generation_tokens", "Tokens generated.")
        self._success = Counter("potluck_request_success", "Requests that finished, by finish reason: stop, length, "
                                "or abort (the client left or the request failed).", ["model_name", "finished_reason"],
                                registry=registry)  # fmt: skip
        self._model_name = model_name
        self.requests = Counter(
            "potluck_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=registry
        )
        Info("potluck_build", "The potluck version serving, and its model.", registry=registry).info(
            {"version": potluck_version(), "model_name": model_name})
        registry.register(EngineCollector(snapshot))

    def finished(self, reason: str) -> None:
        """One request out of the engine: `reason` is its finish_reason, or "abort"."""
        self._success.labels(model_name=self._model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Queue depths and per-agent counters, read from the engine's snapshot at scrape time."""

    def __init__(self, snapshot: SnapshotSource) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Metric names are fixed; describing them up front would need a snapshot.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        running = GaugeMetricFamily("potluck_requests_running", "Requests being computed now.")
        waiting = GaugeMetricFamily("potluck_requests_waiting", "Requests queued, not yet running.")
        running.add_metric([], snap.running if snap else 0)
        waiting.add_metric([], snap.waiting if snap else 0)
        yield running
        yield waiting
        migrations = CounterMetricFamily("potluck_migrations", "Placement re-plans that moved experts between agents.")
        moved = CounterMetricFamily("potluck_migration_bytes", "Expert bytes the agents were asked to gain by "
                                    "migrations (each read from the gaining agent's disk).")
        migrations.add_metric([], snap.migrations if snap else 0)
        moved.add_metric([], snap.migration_bytes if snap else 0)
        yield migrations
        yield moved
        for name, doc, value in (
                ("potluck_decode_prefetch_experts", "Experts the pool-wide decode prefetch had agents read: those "
                 "the running requests' prompts chose most, in place of cache entries they chose less.",
                 snap.prefetch_experts if snap else 0),
                ("potluck_decode_prefetch_hits", "Decode selections (per token and expert) of an expert the "
                 "pool-wide decode prefetch read.", snap.prefetch_hits if snap else 0),
                ("potluck_decode_prefetch_misses", "Decode selections of an expert no agent held when the pool-wide "
                 "decode prefetch planned, nor read (read on demand).", snap.prefetch_misses if snap else 0)):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        unheld = GaugeMetricFamily("potluck_experts_unheld", "Routed experts no agent up holds (resident or "
                                   "being read), at the last poll: each is read from disk wherever it is next needed. "
                                   "0 once the agents' memory holds the whole model (NaN before the model is known).")
        unheld.add_metric([], math.nan if snap is None or snap.unheld_experts is None else snap.unheld_experts)
        yield unheld
        cost = GaugeMetricFamily("potluck_placement_cost", "C(P) of the placement in force: the last re-plan "
                                 "period's expert selections whose home agent did not hold the expert (NaN before "
                                 "the first re-plan).")
        cost.add_metric([], math.nan if snap is None or snap.placement_cost is None else snap.placement_cost)
        yield cost
        yield from _agent_families(snap.agents if snap else ())


# (metric name, help, AgentSnapshot attribute); counters get "_total" from the client library.
_AGENT_COUNTERS = (
    ("potluck_agent_expert_cache_hits", "Expert requests served from the agent's buffer.", "hits"),
    ("potluck_agent_expert_cache_misses", "Expert requests that needed a load.", "misses"),
    ("potluck_agent_expert_cache_loads", "Experts read from the agent's expert store.", "loads"),
    ("potluck_agent_expert_cache_evictions", "Experts dropped to stay within the memory budget.", "evictions"),
    ("potluck_agent_disk_read_bytes", "Bytes read from the agent's expert store.", "bytes_read"),
    ("potluck_agent_link_sent_bytes", "Tensor bytes the agent sent over its link.", "bytes_sent"),
    ("potluck_agent_attention_seconds", "Seconds the agent spent in attention.", "attention_s"),
    ("potluck_agent_expert_prefetches", "Experts read because a speculative prefetch asked for them.", "prefetches"),
    ("potluck_agent_prefetch_predicted_used", "Experts used that the previous layer's prediction named "
     "(prefetch recall = this / potluck_agent_prefetch_used_total).", "predicted_used"),
    ("potluck_agent_prefetch_used", "Experts used in layers that had a prediction.", "used"),
    ("potluck_agent_prefetch_predicted_pairs", "(token, slot) pairs, in layers that had a prediction, whose expert "
     "the previous layer's prediction named (pair recall = this / potluck_agent_prefetch_pairs_total; it weighs "
     "each expert by its tokens).", "predicted_pairs_used"),
    ("potluck_agent_prefetch_pairs", "(token, slot) pairs routed in layers that had a prediction.", "pairs_used"),
    ("potluck_agent_expert_fills", "Experts no agent held, read into the agent's free memory between requests.",
     "fills"),
    ("potluck_agent_expert_fill_preemptions", "Fill reads stopped part-way to give the disk to a demand or "
     "prefetch read (each is read again later).", "fill_preemptions"),
    ("potluck_agent_cpu_seconds", "CPU seconds of the agent's process, every thread.", "cpu_s"),
    ("potluck_agent_paced_cpu_seconds", "CPU seconds the agent's compute thread spent in work paced to its "
     "compute share (0 when unpaced; the rest of its CPU runs at the host's speed).", "paced_cpu_s"),
    ("potluck_agent_compute_overrun_seconds", "Seconds of paced compute past the agent's emulated speed "
     "(compute_share): the host could not give it its share.", "compute_overrun_s"),
    ("potluck_agent_direct_expert_sends", "Experts whose tokens the agent sent to their executor as soon as its "
     "router had run, by a direct route from the scheduler (before the layer's plan).", "direct_sent"),
    ("potluck_agent_decode_steps", "Decode steps the agent ran as a home agent (one token for each request "
     "decoding there; steps that only prefilled prompts are not counted).", "decode_steps"),
    ("potluck_agent_decode_tokens", "Tokens the agent decoded as a home agent.", "decode_tokens"),
    ("potluck_agent_decode_round_trips", "Synchronous waits on peers within the agent's decode steps: one per "
     "layer that sent tokens to remote expert holders (in parallel), one per layer that waited for K/V still "
     "arriving from a peer.", "decode_round_trips"),
    ("potluck_agent_decode_remote_experts", "Expert runs of the agent's decode steps (prompts prefilled there "
     "included) sent to a remote holder (per layer and expert).", "decode_remote_experts"),
    ("potluck_agent_local_expert_calls", "Expert runs (per layer and expert) of the agent's decode steps on "
     "experts it held: the placement's hits.", "decode_local_experts"),
    ("potluck_agent_remote_expert_calls", "Expert runs (per layer and expert) of the agent's decode steps sent "
     "to the agent holding the expert: the placement's misses (same as potluck_agent_decode_remote_experts).",
     "decode_remote_experts"),
    ("potluck_agent_placement_reads", "Experts the agent read because its placement named them (migrations "
     "and first placements).", "placement_reads"),
    ("potluck_agent_decode_step_seconds", "Wall time of the agent's decode steps (those counted in "
     "potluck_agent_decode_steps_total).", "decode_step_s"),
    ("potluck_agent_decode_peer_wait_seconds", "Of the decode steps' time, seconds waiting on peers only: remote "
     "experts, split attention, K/V still arriving.", "decode_peer_wait_s"),
    ("potluck_agent_decode_read_wait_seconds", "Of the decode steps' time, seconds waiting on experts read on "
     "demand from the agent's own disk because no agent held them (remote runs of the same layer beside).",
     "decode_read_wait_s"),
    ("potluck_agent_decode_split_experts", "Expert runs (per layer and expert) of the agent's decode steps "
     "split into slices over the agents (--expert-split): each agent reads and runs its share.",
     "decode_split_experts"),
    ("potluck_agent_prefill_split_experts", "Expert runs (per layer and expert) of the agent's sequence-parallel "
     "prefill tokens split into slices over the agents by the token scheduling's load balance.",
     "prefill_split_experts"),
    ("potluck_agent_decode_fallback_experts", "Expert runs (per layer and expert, slices included) of the agent's "
     "decode steps that it ran itself because the holder its routing table named could not be reached.",
     "decode_fallback_experts"),
    ("potluck_agent_slice_runs", "Expert slices (per layer and expert) the agent ran for decoding agents' split "
     "experts, its own included.", "slice_runs"),
    ("potluck_agent_decode_prefetch_reads", "Experts the agent read ahead of a request's decode, from what the "
     "prompt it prefilled chose most (--no-decode-prefetch turns it off).", "decode_prefetch_reads"),
    ("potluck_agent_decode_prefetch_hits", "Decode selections (per token and expert) of an expert the request's "
     "prefetch read.", "decode_prefetch_hits"),
    ("potluck_agent_decode_prefetch_misses", "Decode selections of an expert the home neither held when the "
     "prefetch was planned nor read; hit rate = hits / (hits + misses).", "decode_prefetch_misses"),
    ("potluck_agent_read_ahead", "Slices the agent began reading on a home's guess of its next decode layer "
     "(the next layer's router on this layer's hidden state).", "read_ahead"),
    ("potluck_agent_read_ahead_used", "Of the slices read ahead, those a home then asked for; used / read ahead "
     "is the guess's precision.", "read_ahead_used"),
    ("potluck_agent_decode_split_attention", "Attentions (per layer and request) of the agent's decode steps over "
     "prompt K/V still on the agents it is moving from (split-KV), where waiting for it would cost more than a "
     "round trip.", "decode_split_attention"),
    ("potluck_agent_home_prefill_tokens", "Prompt tokens the agent prefilled as a home agent, in its decode "
     "steps (short prompts; longer ones are prefilled sequence-parallel).", "home_prefill_tokens"),
)
_AGENT_GAUGES = (
    ("potluck_agent_up", "1 if the scheduler reaches the agent, else 0.", "up"),
    ("potluck_agent_expert_cache_bytes", "Expert buffer bytes resident now.", "bytes_used"),
    ("potluck_agent_expert_cache_capacity_bytes", "Expert buffer budget in bytes (0 = unlimited).", "capacity_bytes"),
    ("potluck_agent_requests", "Requests the agent holds state for (prefill K/V or a decode cache).", "requests"),
)


def _agent_families(agents: tuple[AgentSnapshot, ...]) -> Iterator[Metric]:
    for name, help_text, attr in _AGENT_GAUGES:
        gauge = GaugeMetricFamily(name, help_text, labels=["agent"])
        for agent in agents:
            gauge.add_metric([agent.name], float(getattr(agent, attr)))
        yield gauge
    for name, help_text, attr in _AGENT_COUNTERS:
        counter = CounterMetricFamily(name, help_text, labels=["agent"])
        for agent in agents:
            counter.add_metric([agent.name], float(getattr(agent, attr)))
        yield counter
    early = CounterMetricFamily(
        "potluck_agent_early_expert_runs", "Experts an agent ran on its own tokens as soon as its router had run, "
        "before the scheduler's plan arrived; outcome=used when the plan agreed, dropped when it sent them elsewhere.",
        labels=["agent", "outcome"])
    for agent in agents:
        early.add_metric([agent.name, "used"], float(agent.early_used))
        early.add_metric([agent.name, "dropped"], float(agent.early_dropped))
    yield early


class RequestCounter:
    """ASGI middleware counting every HTTP response by route template and status code.

    The label is the route's path template (e.g. `/v1/models/{model}`), never the raw path, so
    the number of series stays bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before starting a response, the server answers 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
