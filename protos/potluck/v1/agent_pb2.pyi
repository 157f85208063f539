from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertSplit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERT_SPLIT_UNSPECIFIED: _ClassVar[ExpertSplit]
    EXPERT_SPLIT_AUTO: _ClassVar[ExpertSplit]
    EXPERT_SPLIT_NEVER: _ClassVar[ExpertSplit]
    EXPERT_SPLIT_ALWAYS: _ClassVar[ExpertSplit]
EXPERT_SPLIT_UNSPECIFIED: ExpertSplit
EXPERT_SPLIT_AUTO: ExpertSplit
EXPERT_SPLIT_NEVER: ExpertSplit
EXPERT_SPLIT_ALWAYS: ExpertSplit

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("expert_memory_bytes", "disk_bytes_per_s", "link_bytes_per_s", "compute_share", "link_latency_s")
    EXPERT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LINK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    LINK_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    expert_memory_bytes: int
    disk_bytes_per_s: float
    link_bytes_per_s: float
    compute_share: float
    link_latency_s: float
    def __init__(self, expert_memory_bytes: _Optional[int] = ..., disk_bytes_per_s: _Optional[float] = ..., link_bytes_per_s: _Optional[float] = ..., compute_share: _Optional[float] = ..., link_latency_s: _Optional[float] = ...) -> None: ...

class CacheCounters(_message.Message):
    __slots__ = ("hits", "misses", "loads", "evictions", "bytes_read", "bytes_sent", "bytes_used", "capacity_bytes", "attention_seconds", "prefetches", "predicted_used", "used", "compute_overrun_seconds", "early_experts_used", "early_experts_dropped", "fills", "fill_preemptions", "direct_experts_sent", "decode_steps", "decode_tokens", "decode_round_trips", "decode_remote_experts", "requests", "predicted_pairs_used", "pairs_used", "home_prefill_tokens", "decode_split_attention", "cpu_seconds", "paced_cpu_seconds", "decode_local_experts", "placement_reads", "decode_step_seconds", "decode_peer_wait_seconds", "decode_read_wait_seconds", "decode_split_experts", "slice_runs", "decode_prefetch_reads", "decode_prefetch_hits", "decode_prefetch_misses", "read_ahead", "read_ahead_used", "prefill_split_experts", "decode_fallback_experts")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_USED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_OVERRUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EARLY_EXPERTS_USED_FIELD_NUMBER: _ClassVar[int]
    EARLY_EXPERTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FILLS_FIELD_NUMBER: _ClassVar[int]
    FILL_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_EXPERTS_SENT_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_REMOTE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PAIRS_USED_FIELD_NUMBER: _ClassVar[int]
    PAIRS_USED_FIELD_NUMBER: _ClassVar[int]
    HOME_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SPLIT_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PACED_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_LOCAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_READS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_PEER_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_READ_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SPLIT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SLICE_RUNS_FIELD_NUMBER: _ClassVar[int]
    DECODE_PREFETCH_READS_FIELD_NUMBER: _ClassVar[int]
    DECODE_PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    DECODE_PREFETCH_MISSES_FIELD_NUMBER: _ClassVar[int]
    READ_AHEAD_FIELD_NUMBER: _ClassVar[int]
    READ_AHEAD_USED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SPLIT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FALLBACK_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    loads: int
    evictions: int
    bytes_read: int
    bytes_sent: int
    bytes_used: int
    capacity_bytes: int
    attention_seconds: float
    prefetches: int
    predicted_used: int
    used: int
    compute_overrun_seconds: float
    early_experts_used: int
    early_experts_dropped: int
    fills: int
    fill_preemptions: int
    direct_experts_sent: int
    decode_steps: int
    decode_tokens: int
    decode_round_trips: int
    decode_remote_experts: int
    requests: int
    predicted_pairs_used: int
    pairs_used: int
    home_prefill_tokens: int
    decode_split_attention: int
    cpu_seconds: float
    paced_cpu_seconds: float
    decode_local_experts: int
    placement_reads: int
    decode_step_seconds: float
    decode_peer_wait_seconds: float
    decode_read_wait_seconds: float
    decode_split_experts: int
    slice_runs: int
    decode_prefetch_reads: int
    decode_prefetch_hits: int
    decode_prefetch_misses: int
    read_ahead: int
    read_ahead_used: int
    prefill_split_experts: int
    decode_fallback_experts: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_used: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., attention_seconds: _Optional[float] = ..., prefetches: _Optional[int] = ..., predicted_used: _Optional[int] = ..., used: _Optional[int] = ..., compute_overrun_seconds: _Optional[float] = ..., early_experts_used: _Optional[int] = ..., early_experts_dropped: _Optional[int] = ..., fills: _Optional[int] = ..., fill_preemptions: _Optional[int] = ..., direct_experts_sent: _Optional[int] = ..., decode_steps: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., decode_round_trips: _Optional[int] = ..., decode_remote_experts: _Optional[int] = ..., requests: _Optional[int] = ..., predicted_pairs_used: _Optional[int] = ..., pairs_used: _Optional[int] = ..., home_prefill_tokens: _Optional[int] = ..., decode_split_attention: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., paced_cpu_seconds: _Optional[float] = ..., decode_local_experts: _Optional[int] = ..., placement_reads: _Optional[int] = ..., decode_step_seconds: _Optional[float] = ..., decode_peer_wait_seconds: _Optional[float] = ..., decode_read_wait_seconds: _Optional[float] = ..., decode_split_experts: _Optional[int] = ..., slice_runs: _Optional[int] = ..., decode_prefetch_reads: _Optional[int] = ..., decode_prefetch_hits: _Optional[int] = ..., decode_prefetch_misses: _Optional[int] = ..., read_ahead: _Optional[int] = ..., read_ahead_used: _Optional[int] = ..., prefill_split_experts: _Optional[int] = ..., decode_fallback_experts: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("name", "model_type", "num_layers", "num_experts", "vocab_size", "profile", "model_fingerprint", "expert_bytes", "expert_flops_per_s", "hidden_size", "dtype_bytes", "max_positions", "dense_layers", "data_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FLOPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DENSE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_type: str
    num_layers: int
    num_experts: int
    vocab_size: int
    profile: DeviceProfile
    model_fingerprint: str
    expert_bytes: int
    expert_flops_per_s: float
    hidden_size: int
    dtype_bytes: int
    max_positions: int
    dense_layers: _containers.RepeatedScalarFieldContainer[int]
    data_port: int
    def __init__(self, name: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., vocab_size: _Optional[int] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., expert_bytes: _Optional[int] = ..., expert_flops_per_s: _Optional[float] = ..., hidden_size: _Optional[int] = ..., dtype_bytes: _Optional[int] = ..., max_positions: _Optional[int] = ..., dense_layers: _Optional[_Iterable[int]] = ..., data_port: _Optional[int] = ...) -> None: ...

class StepPeer(_message.Message):
    __slots__ = ("name", "address", "new_min_position", "new_max_position", "cached_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEW_MIN_POSITION_FIELD_NUMBER: _ClassVar[int]
    NEW_MAX_POSITION_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    new_min_position: int
    new_max_position: int
    cached_tokens: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., new_min_position: _Optional[int] = ..., new_max_position: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class BeginStepRequest(_message.Message):
    __slots__ = ("request_id", "step", "token_ids", "positions", "peers", "all_logits", "predict", "holdings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ALL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    PREDICT_FIELD_NUMBER: _ClassVar[int]
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    peers: _containers.RepeatedCompositeFieldContainer[StepPeer]
    all_logits: bool
    predict: bool
    holdings: bool
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., peers: _Optional[_Iterable[_Union[StepPeer, _Mapping]]] = ..., all_logits: _Optional[bool] = ..., predict: _Optional[bool] = ..., holdings: _Optional[bool] = ...) -> None: ...

class BeginStepReply(_message.Message):
    __slots__ = ("predicted_counts", "next_resident", "next_loading", "resident_total", "held")
    PREDICTED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    NEXT_LOADING_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    predicted_counts: _containers.RepeatedScalarFieldContainer[int]
    next_resident: _containers.RepeatedScalarFieldContainer[int]
    next_loading: _containers.RepeatedScalarFieldContainer[int]
    resident_total: int
    held: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, predicted_counts: _Optional[_Iterable[int]] = ..., next_resident: _Optional[_Iterable[int]] = ..., next_loading: _Optional[_Iterable[int]] = ..., resident_total: _Optional[int] = ..., held: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertAssignment(_message.Message):
    __slots__ = ("expert", "owner", "executor", "tokens")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    owner: str
    executor: str
    tokens: int
    def __init__(self, expert: _Optional[int] = ..., owner: _Optional[str] = ..., executor: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class DirectRoute(_message.Message):
    __slots__ = ("expert", "executor")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    expert: int
    executor: str
    def __init__(self, expert: _Optional[int] = ..., executor: _Optional[str] = ...) -> None: ...

class RoutingPlan(_message.Message):
    __slots__ = ("layer", "assignments", "splits")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    assignments: _containers.RepeatedCompositeFieldContainer[ExpertAssignment]
    splits: _containers.RepeatedCompositeFieldContainer[SplitRun]
    def __init__(self, layer: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[ExpertAssignment, _Mapping]]] = ..., splits: _Optional[_Iterable[_Union[SplitRun, _Mapping]]] = ...) -> None: ...

class SplitRun(_message.Message):
    __slots__ = ("expert", "nodes")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    expert: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expert: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "layer", "plan", "prefetch", "predict", "direct")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    PREDICT_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    plan: RoutingPlan
    prefetch: _containers.RepeatedScalarFieldContainer[int]
    predict: bool
    direct: _containers.RepeatedCompositeFieldContainer[DirectRoute]
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., plan: _Optional[_Union[RoutingPlan, _Mapping]] = ..., prefetch: _Optional[_Iterable[int]] = ..., predict: _Optional[bool] = ..., direct: _Optional[_Iterable[_Union[DirectRoute, _Mapping]]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("expert_token_counts", "resident_experts", "loading_experts", "attention_seconds", "predicted_counts", "resident_total", "next_resident", "next_loading")
    EXPERT_TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOADING_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    NEXT_LOADING_FIELD_NUMBER: _ClassVar[int]
    expert_token_counts: _containers.RepeatedScalarFieldContainer[int]
    resident_experts: _containers.RepeatedScalarFieldContainer[int]
    loading_experts: _containers.RepeatedScalarFieldContainer[int]
    attention_seconds: float
    predicted_counts: _containers.RepeatedScalarFieldContainer[int]
    resident_total: int
    next_resident: _containers.RepeatedScalarFieldContainer[int]
    next_loading: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, expert_token_counts: _Optional[_Iterable[int]] = ..., resident_experts: _Optional[_Iterable[int]] = ..., loading_experts: _Optional[_Iterable[int]] = ..., attention_seconds: _Optional[float] = ..., predicted_counts: _Optional[_Iterable[int]] = ..., resident_total: _Optional[int] = ..., next_resident: _Optional[_Iterable[int]] = ..., next_loading: _Optional[_Iterable[int]] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("request_id", "plan")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plan: RoutingPlan
    def __init__(self, request_id: _Optional[str] = ..., plan: _Optional[_Union[RoutingPlan, _Mapping]] = ...) -> None: ...

class FinishReply(_message.Message):
    __slots__ = ("logits", "positions")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStateReply(_message.Message):
    __slots__ = ("counters", "resident", "loading", "placed", "slices", "expert_read_s", "round_trip_s")
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_READ_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIP_S_FIELD_NUMBER: _ClassVar[int]
    counters: CacheCounters
    resident: _containers.RepeatedScalarFieldContainer[int]
    loading: _containers.RepeatedScalarFieldContainer[int]
    placed: _containers.RepeatedScalarFieldContainer[int]
    slices: _containers.RepeatedCompositeFieldContainer[SliceRef]
    expert_read_s: float
    round_trip_s: float
    def __init__(self, counters: _Optional[_Union[CacheCounters, _Mapping]] = ..., resident: _Optional[_Iterable[int]] = ..., loading: _Optional[_Iterable[int]] = ..., placed: _Optional[_Iterable[int]] = ..., slices: _Optional[_Iterable[_Union[SliceRef, _Mapping]]] = ..., expert_read_s: _Optional[float] = ..., round_trip_s: _Optional[float] = ...) -> None: ...

class SliceRef(_message.Message):
    __slots__ = ("expert", "part", "of")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    OF_FIELD_NUMBER: _ClassVar[int]
    expert: int
    part: int
    of: int
    def __init__(self, expert: _Optional[int] = ..., part: _Optional[int] = ..., of: _Optional[int] = ...) -> None: ...

class FillRequest(_message.Message):
    __slots__ = ("experts", "evict", "prefetch")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    evict: _containers.RepeatedScalarFieldContainer[int]
    prefetch: bool
    def __init__(self, experts: _Optional[_Iterable[int]] = ..., evict: _Optional[_Iterable[int]] = ..., prefetch: _Optional[bool] = ...) -> None: ...

class FillReply(_message.Message):
    __slots__ = ("accepted", "evicted")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    evicted: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, accepted: _Optional[_Iterable[int]] = ..., evicted: _Optional[_Iterable[int]] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ("experts", "sources")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    sources: _containers.RepeatedCompositeFieldContainer[ExpertSource]
    def __init__(self, experts: _Optional[_Iterable[int]] = ..., sources: _Optional[_Iterable[_Union[ExpertSource, _Mapping]]] = ...) -> None: ...

class ExpertSource(_message.Message):
    __slots__ = ("expert", "holder", "address")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    holder: str
    address: str
    def __init__(self, expert: _Optional[int] = ..., holder: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class PlacementReply(_message.Message):
    __slots__ = ("placed", "resident")
    PLACED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    placed: int
    resident: int
    def __init__(self, placed: _Optional[int] = ..., resident: _Optional[int] = ...) -> None: ...

class FetchExpertRequest(_message.Message):
    __slots__ = ("layer", "expert", "chunk")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    chunk: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., chunk: _Optional[int] = ...) -> None: ...

class ExpertPart(_message.Message):
    __slots__ = ("gate", "up", "down", "chunk", "num_chunks")
    GATE_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    gate: Tensor
    up: Tensor
    down: Tensor
    chunk: int
    num_chunks: int
    def __init__(self, gate: _Optional[_Union[Tensor, _Mapping]] = ..., up: _Optional[_Union[Tensor, _Mapping]] = ..., down: _Optional[_Union[Tensor, _Mapping]] = ..., chunk: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class KVBlock(_message.Message):
    __slots__ = ("request_id", "step", "layer", "sender", "keys", "values", "positions", "chunk", "num_chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    layer: int
    sender: str
    keys: Tensor
    values: Tensor
    positions: _containers.RepeatedScalarFieldContainer[int]
    chunk: int
    num_chunks: int
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., layer: _Optional[int] = ..., sender: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Iterable[int]] = ..., chunk: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttendRequest(_message.Message):
    __slots__ = ("request_id", "layer", "queries")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    queries: Tensor
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttendReply(_message.Message):
    __slots__ = ("output", "lse")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    lse: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExpertBatch(_message.Message):
    __slots__ = ("request_id", "layer", "hidden", "expert_ids", "weights", "decode", "slice_part", "slice_of", "read_ahead")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    SLICE_PART_FIELD_NUMBER: _ClassVar[int]
    SLICE_OF_FIELD_NUMBER: _ClassVar[int]
    READ_AHEAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    hidden: Tensor
    expert_ids: Tensor
    weights: Tensor
    decode: bool
    slice_part: int
    slice_of: int
    read_ahead: _containers.RepeatedCompositeFieldContainer[SliceAhead]
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., decode: _Optional[bool] = ..., slice_part: _Optional[int] = ..., slice_of: _Optional[int] = ..., read_ahead: _Optional[_Iterable[_Union[SliceAhead, _Mapping]]] = ...) -> None: ...

class SliceAhead(_message.Message):
    __slots__ = ("layer", "expert", "part", "of")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    OF_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    part: int
    of: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., part: _Optional[int] = ..., of: _Optional[int] = ...) -> None: ...

class ExpertResult(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AgentAddress(_message.Message):
    __slots__ = ("name", "address", "data_address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    data_address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., data_address: _Optional[str] = ...) -> None: ...

class ExpertHolders(_message.Message):
    __slots__ = ("expert", "holders")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    holders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expert: _Optional[int] = ..., holders: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertRun(_message.Message):
    __slots__ = ("expert", "nodes")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    expert: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expert: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "agents", "experts", "expert_split", "no_decode_prefetch", "runs", "no_load_balance")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SPLIT_FIELD_NUMBER: _ClassVar[int]
    NO_DECODE_PREFETCH_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NO_LOAD_BALANCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentAddress]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertHolders]
    expert_split: ExpertSplit
    no_decode_prefetch: bool
    runs: _containers.RepeatedCompositeFieldContainer[ExpertRun]
    no_load_balance: bool
    def __init__(self, version: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentAddress, _Mapping]]] = ..., experts: _Optional[_Iterable[_Union[ExpertHolders, _Mapping]]] = ..., expert_split: _Optional[_Union[ExpertSplit, str]] = ..., no_decode_prefetch: _Optional[bool] = ..., runs: _Optional[_Iterable[_Union[ExpertRun, _Mapping]]] = ..., no_load_balance: _Optional[bool] = ...) -> None: ...

class AdoptKVRequest(_message.Message):
    __slots__ = ("request_id", "capacity", "prompt_tokens", "sources", "prefill_here", "sampling", "sampled", "prompt_counts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    capacity: int
    prompt_tokens: int
    sources: _containers.RepeatedCompositeFieldContainer[AgentAddress]
    prefill_here: bool
    sampling: SamplingParams
    sampled: int
    prompt_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., capacity: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[AgentAddress, _Mapping]]] = ..., prefill_here: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., sampled: _Optional[int] = ..., prompt_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "logprobs", "top_logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    top_logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class AdoptKVReply(_message.Message):
    __slots__ = ("local_tokens",)
    LOCAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    local_tokens: int
    def __init__(self, local_tokens: _Optional[int] = ...) -> None: ...

class FetchKVRequest(_message.Message):
    __slots__ = ("request_id", "layer", "chunk")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    chunk: int
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., chunk: _Optional[int] = ...) -> None: ...

class DecodeSpan(_message.Message):
    __slots__ = ("request_id", "position", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeStepRequest(_message.Message):
    __slots__ = ("spans", "logits")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[DecodeSpan]
    logits: bool
    def __init__(self, spans: _Optional[_Iterable[_Union[DecodeSpan, _Mapping]]] = ..., logits: _Optional[bool] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("sampled", "token_id", "logprob", "top_ids", "top_logprobs", "is_stop")
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IS_STOP_FIELD_NUMBER: _ClassVar[int]
    sampled: bool
    token_id: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    is_stop: bool
    def __init__(self, sampled: _Optional[bool] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., is_stop: _Optional[bool] = ...) -> None: ...

class DecodeStepReply(_message.Message):
    __slots__ = ("logits", "round_trips", "gathered", "tokens", "selections")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    GATHERED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    round_trips: int
    gathered: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    selections: Tensor
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., round_trips: _Optional[int] = ..., gathered: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., selections: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PeerFrame(_message.Message):
    __slots__ = ("call", "batch", "result", "error", "ping", "pong")
    CALL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    call: int
    batch: ExpertBatch
    result: ExpertResult
    error: str
    ping: bool
    pong: bool
    def __init__(self, call: _Optional[int] = ..., batch: _Optional[_Union[ExpertBatch, _Mapping]] = ..., result: _Optional[_Union[ExpertResult, _Mapping]] = ..., error: _Optional[str] = ..., ping: _Optional[bool] = ..., pong: _Optional[bool] = ...) -> None: ...
