"""The peer plane's messages (agent -> agent, gRPC and the decode data plane) and the error
metadata that names a failed agent."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from protos.ids import ExpertId, SliceId
from protos.messages import ExpertBatch, KVBlock
from protos.potluck.v1 import agent_pb2 as pb
from protos.convert.tensors import tensor_from_proto, tensor_to_proto


# Peer plane (agent -> agent) ------------------------------------------------------------------


def kv_block_to_proto(block: KVBlock) -> pb.KVBlock:
    return pb.KVBlock(request_id=block.request_id, step=block.step, layer=block.layer, sender=block.sender,
                      keys=tensor_to_proto(block.keys), values=tensor_to_proto(block.values),
                      positions=block.positions.tolist(), chunk=block.chunk, num_chunks=block.num_chunks)


def kv_block_from_proto(msg: pb.KVBlock) -> KVBlock:
    """ValueError when the rows of keys, values and positions disagree."""
    keys, values = tensor_from_proto(msg.keys), tensor_from_proto(msg.values)
    positions = torch.tensor(list(msg.positions), dtype=torch.long)
    if keys.dim() != 3 or keys.shape != values.shape or keys.shape[0] != positions.numel():
        raise ValueError(f"K/V block shapes disagree: keys {list(keys.shape)}, values {list(values.shape)}, "
                         f"{positions.numel()} positions")
    return KVBlock(request_id=msg.request_id, step=msg.step, layer=msg.layer, sender=msg.sender, keys=keys,
                   values=values, positions=positions, chunk=msg.chunk, num_chunks=msg.num_chunks)


def attend_to_proto(request_id: str, layer: int, queries: torch.Tensor) -> pb.AttendRequest:
    """Queries [n, H, hd], RoPE applied."""
    return pb.AttendRequest(request_id=request_id, layer=layer, queries=tensor_to_proto(queries))


def attend_from_proto(msg: pb.AttendRequest) -> tuple[str, int, torch.Tensor]:
    return msg.request_id, msg.layer, tensor_from_proto(msg.queries)


def attend_reply_to_proto(output: torch.Tensor, lse: torch.Tensor) -> pb.AttendReply:
    """Output [n, H, hd] normalised over the shard, and its log-sum-exp [n, H]."""
    return pb.AttendReply(output=tensor_to_proto(output), lse=tensor_to_proto(lse))


def attend_reply_from_proto(msg: pb.AttendReply) -> tuple[torch.Tensor, torch.Tensor]:
    return tensor_from_proto(msg.output), tensor_from_proto(msg.lse)


def expert_batch_to_proto(batch: ExpertBatch) -> pb.ExpertBatch:
    """Expert ids travel as int32 and weights as float32, whatever the compute dtypes."""
    return pb.ExpertBatch(request_id=batch.request_id, layer=batch.layer, hidden=tensor_to_proto(batch.hidden),
                          expert_ids=tensor_to_proto(batch.expert_ids.to(torch.int32)),
                          weights=tensor_to_proto(batch.weights.float()), decode=batch.decode,
                          slice_part=batch.part, slice_of=batch.of,
                          read_ahead=[pb.SliceAhead(layer=a.layer, expert=a.index, part=a.part, of=a.of)
                                      for a in batch.read_ahead])


def expert_batch_from_proto(msg: pb.ExpertBatch) -> ExpertBatch:
    return ExpertBatch(request_id=msg.request_id, layer=msg.layer, hidden=tensor_from_proto(msg.hidden),
                       expert_ids=tensor_from_proto(msg.expert_ids).long(), weights=tensor_from_proto(msg.weights),
                       decode=msg.decode, part=msg.slice_part, of=max(1, msg.slice_of),
                       read_ahead=tuple(SliceId(ExpertId(a.layer, a.expert), a.part, a.of) for a in msg.read_ahead))


def expert_result_to_proto(output: torch.Tensor) -> pb.ExpertResult:
    """The executor's weighted experts [n, D] on the batch's rows."""
    return pb.ExpertResult(output=tensor_to_proto(output))


def expert_result_from_proto(msg: pb.ExpertResult) -> torch.Tensor:
    return tensor_from_proto(msg.output)


def fetch_kv_to_proto(request_id: str, layer: int, chunk: int) -> pb.FetchKVRequest:
    return pb.FetchKVRequest(request_id=request_id, layer=layer, chunk=chunk)


def fetch_kv_from_proto(msg: pb.FetchKVRequest) -> tuple[str, int, int]:
    return msg.request_id, msg.layer, msg.chunk


def fetch_expert_to_proto(layer: int, expert: int, chunk: int) -> pb.FetchExpertRequest:
    return pb.FetchExpertRequest(layer=layer, expert=expert, chunk=chunk)


def fetch_expert_from_proto(msg: pb.FetchExpertRequest) -> tuple[int, int, int]:
    """(layer, expert, chunk)."""
    return msg.layer, msg.expert, msg.chunk


def expert_part_to_proto(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, chunk: int,
                         num_chunks: int) -> pb.ExpertPart:
    return pb.ExpertPart(gate=tensor_to_proto(gate), up=tensor_to_proto(up), down=tensor_to_proto(down), chunk=chunk,
                         num_chunks=num_chunks)


def expert_part_from_proto(msg: pb.ExpertPart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(gate [I_chunk, D], up [I_chunk, D], down [D, I_chunk], chunk, num_chunks)."""
    return (tensor_from_proto(msg.gate), tensor_from_proto(msg.up), tensor_from_proto(msg.down), msg.chunk,
            msg.num_chunks)


FrameBody = pb.ExpertBatch | pb.ExpertResult | str  # a call, its result, or why it failed


def peer_frame_to_proto(call: int, body: FrameBody) -> pb.PeerFrame:
    """A data plane frame. Its body stays a message: the ends convert it as RunExperts does."""
    if isinstance(body, str):
        return pb.PeerFrame(call=call, error=body)
    if isinstance(body, pb.ExpertBatch):
        return pb.PeerFrame(call=call, batch=body)
    return pb.PeerFrame(call=call, result=body)


PING = pb.PeerFrame(ping=True)  # a data plane keepalive; the holder answers PONG at once
PONG = pb.PeerFrame(pong=True)


def peer_frame_from_proto(msg: pb.PeerFrame) -> tuple[int, FrameBody]:
    """ValueError for a frame without a body."""
    kind = msg.WhichOneof("body")
    if kind is None:
        raise ValueError(f"data plane frame {msg.call} has no body")
    body: FrameBody = getattr(msg, kind)
    return msg.call, body


# Errors --------------------------------------------------------------------------------------

# Trailing metadata of an agent's error status: the agent that failed, when it is not the one
# answering (a peer it called), as an AgentAddress (name, gRPC address), serialized.
FAILED_AGENT_KEY = "potluck-failed-agent-bin"


def failed_agent_to_metadata(name: str, address: str) -> tuple[tuple[str, bytes], ...]:
    return ((FAILED_AGENT_KEY, pb.AgentAddress(name=name, address=address).SerializeToString()),)


def failed_agent_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, str] | None:
    """(name, address) of the failed agent the metadata names, or None (the answering agent failed)."""
    for key, value in metadata or ():
        if key == FAILED_AGENT_KEY and isinstance(value, bytes):
            failed = pb.AgentAddress.FromString(value)
            return failed.name, failed.address
    return None
