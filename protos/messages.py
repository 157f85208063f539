"""The Python values of the wire messages both ends read: the scheduler builds them and an agent
acts on them, or an agent reports them and the scheduler decides with them. Each is defined once,
here, so neither side keeps a parallel struct; protos/convert.py turns each into its message and
back (round-trip tested). The scheduler re-exports the ones its decisions use (scheduler/types.py).

    scheduler                                   agent
    AgentInfo            <-- InfoReply ---      (its settings and model)
    BeginStep(Peer...)   --- BeginStepRequest ->
    StepBegun            <-- BeginStepReply ---
    Forward(RoutingPlan) --- ForwardRequest --> LayerPlan (node_agent/dispatch.py: its own share)
    LayerReport          <-- ForwardReply -----
    CacheState           <-- CacheStateReply --
    AdoptKV(SamplingParams, sampled) ----- AdoptKVRequest --->
    DecodeSpan           --- DecodeStepRequest ->  (the home samples: protos/sampling.py)
    DecodeResult(TokenEvent) <-- DecodeStepReply --
                                                agent <-> agent: KVBlock, ExpertBatch

Messages of one to three fields go on the wire from plain values instead (see convert.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos.ids import NodeId, SliceId


@dataclass(frozen=True)
class AgentInfo:
    """What an agent is and what it may give (InfoReply)."""

    name: NodeId
    model_type: str  # "mixtral" | "qwen3_moe"
    num_layers: int
    num_experts: int  # routed experts per MoE layer
    vocab_size: int
    fingerprint: str  # the checkpoint's identity (protos.ids.model_fingerprint)
    expert_bytes: int  # one expert in the agent's memory
    memory_bytes: int  # expert buffer budget, 0 = unlimited
    disk_bytes_per_s: float  # 0 = unlimited
    link_bytes_per_s: float  # 0 = unlimited
    max_positions: int  # the model's context length
    dense_layers: frozenset[int]  # layers without routed experts
    flops_per_s: float  # measured expert matmul speed
    hidden_size: int  # D
    dtype_bytes: int  # bytes per element on the wire
    link_latency_s: float = 0.0  # one-way delay of each message the agent sends, seconds; 0 = none
    data_port: int = 0  # TCP port of its decode data plane on its gRPC host (0: none)
    compute_share: float = 0.0  # emulated compute, fraction of one host core (0 = not paced)


@dataclass(frozen=True)
class Peer:
    """An agent as one step of one request sees it (StepPeer)."""

    name: str  # NodeId
    address: str  # host:port of its gRPC server
    new_min: int  # smallest new position this step, -1 if it has no new tokens
    new_max: int  # largest new position this step, -1 if none
    cached: int  # KV entries it holds from earlier steps

    @property
    def has_new(self) -> bool:
        return self.new_max >= 0


@dataclass(frozen=True)
class BeginStep:
    """Start one step of one request on one agent (BeginStepRequest)."""

    request_id: str
    step: int  # 0 = prefill, then one per chunk or decoded token
    token_ids: tuple[int, ...]  # this agent's new tokens (may be empty)
    positions: tuple[int, ...]  # their absolute positions
    peers: tuple[Peer, ...]  # every agent in the step, this one included
    all_logits: bool  # logits of every new token, not only the last
    predict: bool = False  # guess layer 0's routing from the embeddings
    holdings: bool = False  # list every expert held in the reply


@dataclass(frozen=True)
class LayerReport:
    """One agent's answer after the router of a layer (ForwardReply; BeginStepReply for the
    embeddings). `node` is not on the wire: the receiver knows whom it asked."""

    node: NodeId
    counts: tuple[int, ...]  # tokens it owns routed to each expert; () for a dense-MLP layer
    resident: frozenset[int]  # expert indices of the layer resident in its buffer
    loading: frozenset[int]  # expert indices of the layer being read into its buffer
    attention_s: float = 0.0  # seconds it spent in the layer's attention
    predicted: tuple[int, ...] = ()  # next layer's predicted counts (empty unless asked)
    resident_total: int = 0  # experts of all layers in its buffer, resident or being read (slots taken)
    next_resident: frozenset[int] = frozenset()  # next layer's experts in its buffer
    next_loading: frozenset[int] = frozenset()  # next layer's experts being read


@dataclass(frozen=True)
class StepBegun:
    """An agent's answer to BeginStep (BeginStepReply)."""

    report: LayerReport  # with predict: layer 0's routing guessed from the embeddings, and its cache state
    held: frozenset[int] = frozenset()  # with holdings: experts resident or being read (layer * num_experts + index)


Share = tuple[NodeId, int]  # (executor, tokens): tokens 0 = all the owner's remaining pairs


@dataclass(frozen=True)
class RoutingPlan:
    """Who runs which expert for whose tokens, for one MoE layer of one step (the scheduler decides).

    An owner's (token, slot) pairs routed to an expert go to the shares' executors in row order;
    several shares split them. An expert in `splits` runs in slices instead (expert tensor
    parallelism): every owner sends all its pairs of it to each of the nodes, slice i of m to the
    i-th, and adds up the partial outputs. A pair absent from both runs on its owner.
    """

    layer: int
    shares: dict[tuple[NodeId, int], tuple[Share, ...]]  # (owner, expert index) -> shares
    splits: dict[int, tuple[NodeId, ...]] = field(default_factory=dict)  # expert index -> slice i's node

    @classmethod
    def whole(cls, layer: int, executor: dict[tuple[NodeId, int], NodeId]) -> RoutingPlan:
        """Each (owner, expert) entirely on one executor."""
        return cls(layer, {key: ((node, 0),) for key, node in executor.items()})

    def executors(self, expert: int) -> set[NodeId]:
        whole = {x for (_, e), shares in self.shares.items() if e == expert for x, _ in shares}
        return whole | set(self.splits.get(expert, ()))


@dataclass(frozen=True)
class Forward:
    """One layer of one step on an agent with new tokens (ForwardRequest)."""

    request_id: str
    layer: int  # attention and router of this layer
    plan: RoutingPlan | None  # MoE of layer - 1; None at layer 0
    prefetch: tuple[int, ...] = ()  # experts of `layer` to start reading now (a hint)
    predict: bool = False  # also guess the next layer's routing
    direct: dict[int, NodeId] = field(default_factory=dict)  # expert of `layer` -> executor, sent before the plan


@dataclass(frozen=True, kw_only=True)
class CacheCounters:
    """An agent's counters since start, monotonic but for the gauges (CacheCounters)."""

    hits: int = 0  # expert requests served from memory
    misses: int = 0  # expert requests that needed a load
    loads: int = 0  # experts read from the store
    evictions: int = 0  # experts dropped to stay within the budget
    bytes_read: int = 0  # bytes read from the expert store
    bytes_sent: int = 0  # tensor bytes sent over the link
    bytes_used: int = 0  # expert buffer bytes resident now (a gauge)
    capacity_bytes: int = 0  # expert buffer budget (0 = unlimited)
    attention_s: float = 0.0  # seconds spent in attention
    prefetches: int = 0  # experts read because a prefetch asked
    predicted_used: int = 0  # experts used that the previous layer's prediction named
    used: int = 0  # experts used in layers that had a prediction (recall = predicted_used / used)
    predicted_pairs_used: int = 0  # (token, slot) pairs of those layers whose expert the prediction named
    pairs_used: int = 0  # (token, slot) pairs in layers that had a prediction (pair recall = the ratio)
    compute_overrun_s: float = 0.0  # paced compute past its emulated speed (the host fell short)
    early_used: int = 0  # experts run on its own tokens before the plan came, confirmed by the plan
    early_dropped: int = 0  # such early runs the plan overruled
    fills: int = 0  # experts read into free memory because a fill asked
    fill_preemptions: int = 0  # fill reads stopped part-way for a demand or prefetch read
    direct_sent: int = 0  # experts whose tokens it sent to their executor by a direct route, before the plan
    decode_steps: int = 0  # decode steps it ran as a home agent
    decode_tokens: int = 0  # tokens decoded in them
    decode_round_trips: int = 0  # synchronous waits on peers within its decode steps (at most one per layer)
    decode_remote_experts: int = 0  # (layer, expert) runs of its decode steps sent to remote holders
    home_prefill_tokens: int = 0  # prompt tokens it prefilled as a home, in decode steps' spans
    decode_split_attention: int = 0  # (layer, request) attentions over prompt K/V still at its sources
    cpu_s: float = 0.0  # CPU seconds of its process, every thread
    paced_cpu_s: float = 0.0  # of which paced to its compute share (0 when unpaced)
    requests: int = 0  # requests it holds state for now (prefill K/V or a decode cache; a gauge)
    decode_local_experts: int = 0  # (layer, expert) runs of its decode steps on experts it held
    placement_reads: int = 0  # experts read because its placement named them
    decode_step_s: float = 0.0  # wall time of its decode steps (those counted in decode_steps)
    decode_peer_wait_s: float = 0.0  # of which waiting on peers only (remote experts, split attention, K/V)
    decode_read_wait_s: float = 0.0  # of which waiting on its own on-demand disk reads (peers' runs beside)
    decode_split_experts: int = 0  # (layer, expert) runs of its decode steps split into slices over the agents
    slice_runs: int = 0  # (layer, expert) slices it ran for homes' split experts (its own included)
    decode_prefetch_reads: int = 0  # experts read ahead of decode from its prompts' own selections
    decode_prefetch_hits: int = 0  # decode selections of an expert the request's prefetch read
    decode_prefetch_misses: int = 0  # decode selections of one neither held at the plan nor read
    read_ahead: int = 0  # slices it began reading on a home's guess of its next layer (ExpertBatch.read_ahead)
    read_ahead_used: int = 0  # of those, the ones a home then asked for
    prefill_split_experts: int = 0  # (layer, expert) runs of its prefill tokens split into slices (RoutingPlan.splits)
    decode_fallback_experts: int = 0  # (layer, expert) runs of its decode steps it ran itself, the holder unreachable


@dataclass(frozen=True)
class CacheState:
    """An agent's counters and holdings (CacheStateReply); experts as layer * num_experts + index."""

    counters: CacheCounters
    resident: frozenset[int]  # every resident expert
    loading: frozenset[int]  # every expert whose read is queued or under way
    placed: frozenset[int] = frozenset()  # every expert of the placement (never evicted)
    slices: frozenset[tuple[int, int, int]] = frozenset()  # every slice resident on its own: (expert, part, of)
    expert_read_s: float = 0.0  # one expert's read on its disk, as measured, else as throttled (0: unknown)
    round_trip_s: float = 0.0  # a synchronous wait on decode peers: its last, else its default guess


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (SamplingParams). Validated by the server before it gets here."""

    max_tokens: int  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    seed: int | None = None  # makes sampling reproducible
    stop_token_ids: frozenset[int] = frozenset()  # end-of-sequence ids; not emitted as text
    logprobs: bool = False  # report the chosen token's log-probability
    top_logprobs: int = 0  # and this many alternatives (0..20)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (SampledToken), as the engine yields it to the server."""

    token_id: int
    logprob: float | None = None  # natural log; None unless asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first
    is_stop: bool = False  # the token is an end-of-sequence id (finish_reason "stop")


@dataclass(frozen=True)
class AdoptKV:
    """Make an agent a request's home for decode (AdoptKVRequest)."""

    request_id: str
    capacity: int  # positions to preallocate: prompt + tokens still to generate
    prompt_tokens: int  # positions 0..prompt_tokens-1 must all arrive
    sources: tuple[tuple[NodeId, str], ...]  # (name, gRPC address) of the other agents holding its K/V
    prefill_here: bool = False  # no prefill ran: the home computes the prompt in decode steps' spans
    sampling: SamplingParams = SamplingParams(max_tokens=1)  # how the home samples its tokens
    sampled: int = 0  # tokens of the request sampled before the home's first (prefill's, or before a failure)
    prompt_counts: tuple[int, ...] = ()  # the prefill's selections per (MoE layer, expert), flat; () if not counted


@dataclass(frozen=True)
class DecodeSpan:
    """One request's new tokens in a decode step (DecodeSpan): one token when it decodes, a chunk
    of its prompt when its home prefills it."""

    request_id: str
    token_ids: tuple[int, ...]  # at consecutive positions from `position`
    position: int  # absolute position of token_ids[0]

    @property
    def end(self) -> int:
        """The position after its last token (a span that follows the home's sample: one token)."""
        return self.position + max(1, len(self.token_ids))

    @property
    def follows(self) -> bool:
        """Its token is the one the home sampled for the request in its previous step."""
        return not self.token_ids


@dataclass(frozen=True, eq=False)  # tensors: compare field by field
class DecodeResult:
    """What one decode step gives back (DecodeStepReply)."""

    tokens: tuple[TokenEvent | None, ...]  # tokens[i] sampled after spans[i]; None inside a prompt
    round_trips: int  # synchronous waits on peers the step made
    gathered: tuple[str, ...] = ()  # requests whose prompt K/V is now all on the home
    logits: torch.Tensor | None = None  # [n, V] float32 after each span, when asked for
    # [MoE layers, T, k] int16: the experts each of the step's T tokens (every span's, in order)
    # chose at each MoE layer; the scheduler's activation statistics. None: the model has none
    selections: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)  # tensors: compare field by field
class KVBlock:
    """K/V rows of one layer of a request, pushed by their owner or fetched by a home (KVBlock)."""

    request_id: str
    step: int
    layer: int
    sender: str  # NodeId of the agent whose tokens they are
    keys: torch.Tensor  # [n, KVH, hd], RoPE applied
    values: torch.Tensor  # [n, KVH, hd]
    positions: torch.Tensor  # [n] int64
    chunk: int = 0  # which row chunk of the whole block
    num_chunks: int = 1  # chunks in the whole block


@dataclass(frozen=True, eq=False)  # tensors: compare field by field
class ExpertBatch:
    """An owner's tokens for one executor and one MoE layer (ExpertBatch)."""

    request_id: str
    layer: int
    hidden: torch.Tensor  # [n, D] post-attention-norm hidden states
    expert_ids: torch.Tensor  # [n, k] int64; -1 where the slot runs elsewhere
    weights: torch.Tensor  # [n, k] float32 routing weights
    decode: bool = False  # a decode step's few rows: run at once, not in the layer's grouped pass
    part: int = 0  # with of >= 2: run slice `part` of `of` of each expert (a partial sum; SliceId)
    of: int = 1
    read_ahead: tuple[SliceId, ...] = ()  # slices to start reading after this batch's: the home's guess of its next layer
