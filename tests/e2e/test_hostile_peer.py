"""A hostile client with a valid certificate (the server's, the worst case, or an agent's) against
a real agent process: every oversized or malformed message is refused before it allocates, the
agent's memory stays within its limits, and state nobody touches is released at its time to live.
(Without a certificate of the cluster's CA nothing gets through at all: tests/integration/test_trust.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from protos.convert import tensor_to_proto
from protos.limits import CHANNEL_OPTIONS
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.security import Credentials, agent_identity
from server.launcher import free_port
from tests.e2e.conftest import Agent, certs

INBOX = 32 << 20  # the agent's --max-inbox
MAX_REQUESTS = 4


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, qwen_tiny: Path) -> Iterator[Agent]:
    work = tmp_path_factory.mktemp("hostile")
    certs(work, "mallory")  # an enrolled device gone bad
    running = Agent(work, qwen_tiny, "victim", free_port(), "--max-requests", str(MAX_REQUESTS),
                    "--max-inbox", f"{INBOX}B", "--max-step-tokens", "4096", "--request-ttl", "3s")
    yield running
    running.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stub(agent: Agent, as_who: str) -> pb_grpc.NodeAgentStub:
    """A blocking stub to the agent, with the certificate of `as_who` ("server" or a node)."""
    creds = Credentials.load(agent.certs / ("server" if as_who == "server" else f"nodes/{as_who}"))
    channel = grpc.secure_channel(agent.address, creds.grpc_channel(),
                                  options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", agent_identity(agent.name))])
    return pb_grpc.NodeAgentStub(channel)


def code_of(call: object, request: object) -> grpc.StatusCode:
    try:
        call(request, timeout=60)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def begin(request_id: str, agent: Agent, tokens: int = 1) -> pb.BeginStepRequest:
    return pb.BeginStepRequest(request_id=request_id, step=0, token_ids=[1] * tokens, positions=list(range(tokens)),
                               peers=[pb.StepPeer(name=agent.name, address=agent.address, new_min_position=0,
                                                  new_max_position=tokens - 1)])


def attack(agent: Agent, shape: tuple[int, int]) -> None:
    """Every hostile message once, each refused as it should be; then the requests are released."""
    server, peer = stub(agent, "server"), stub(agent, "mallory")
    # A million token ids in one step (4 MB on the wire; 262 MB of state each before the limits):
    # refused unparsed, as gRPC refuses any message over its size limit. A step within the size
    # of a control message but over --max-step-tokens is refused before anything is embedded.
    for _ in range(16):
        assert code_of(server.BeginStep, begin("huge", agent, 1_000_000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(peer.BeginStep, begin("huge", agent, 1_000_000)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(server.BeginStep, begin("long", agent, 5000)) == grpc.StatusCode.INVALID_ARGUMENT
    # More requests than the agent holds: the rest are refused, not queued.
    codes = [code_of(server.BeginStep, begin(f"r{i}", agent)) for i in range(MAX_REQUESTS + 3)]
    assert codes == [grpc.StatusCode.OK] * MAX_REQUESTS + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    # Control calls with an agent's certificate: refused before they are read.
    assert code_of(peer.BeginStep, begin("x", agent)) == grpc.StatusCode.PERMISSION_DENIED
    # K/V (from an enrolled peer) for a made-up layer, or of another shape: refused.
    heads, dim = 3, 7  # not the model's
    bad = pb.KVBlock(request_id="r0", step=0, layer=10**6, sender="x", keys=tensor_to_proto(torch.zeros(4, heads, dim)),
                     values=tensor_to_proto(torch.zeros(4, heads, dim)), positions=[0, 1, 2, 3], num_chunks=1)
    assert code_of(peer.PushKV, bad) == grpc.StatusCode.INVALID_ARGUMENT
    bad.layer = 0
    assert code_of(peer.PushKV, bad) == grpc.StatusCode.INVALID_ARGUMENT
    # Well-formed K/V until the inbox is full: about 4 MB a block, 64 MB offered to 32 MiB.
    rows = (4 << 20) // (2 * shape[0] * shape[1] * 4)
    block = pb.KVBlock(request_id="r0", step=0, layer=1, keys=tensor_to_proto(torch.zeros(rows, *shape)),
                       values=tensor_to_proto(torch.zeros(rows, *shape)), positions=[i % 64 for i in range(rows)],
                       num_chunks=1 << 20)
    codes = []
    for i in range(16):
        block.sender, block.chunk = f"peer{i}", i
        codes.append(code_of(peer.PushKV, block))
    assert grpc.StatusCode.OK in codes and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    for i in range(MAX_REQUESTS):
        server.Release(pb.ReleaseRequest(request_id=f"r{i}"), timeout=60)


def test_no_message_grows_the_agent_past_its_limits(agent: Agent, qwen_tiny: Path) -> None:
    """The first round may leave the allocator's high-water mark (the inbox filled once, freed
    messages kept for reuse); later rounds must not add to it. Before the size gate, each round's
    32 refused BeginSteps alone kept about 100 MB."""
    assert stub(agent, "server").Info(pb.InfoRequest(), timeout=60).name == "victim"
    before = rss_bytes(agent.proc.pid)
    attack(agent, _kv_shape(qwen_tiny))
    first = rss_bytes(agent.proc.pid)
    for _ in range(3):
        attack(agent, _kv_shape(qwen_tiny))
    last = rss_bytes(agent.proc.pid)
    mib = 2**20
    assert first - before < INBOX + 128 * mib, f"one round grew the agent by {(first - before) / mib:.0f} MiB"
    # Under load the allocator's noise reached 64 MiB; before the gate three rounds kept about 300.
    assert last - first < 128 * mib, f"three more rounds grew it by {(last - first) / mib:.0f} MiB"


def test_state_nobody_touches_is_released(agent: Agent) -> None:
    server = stub(agent, "server")
    server.Release(pb.ReleaseRequest(request_id="r0"), timeout=60)
    assert code_of(server.BeginStep, begin("forgotten", agent)) in (grpc.StatusCode.OK,
                                                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
    deadline = time.monotonic() + 60
    while server.CacheState(pb.CacheStateRequest(), timeout=60).counters.requests:
        assert time.monotonic() < deadline, "requests still held a minute after their 3 s time to live"
        time.sleep(0.5)
    assert "untouched for 3 s" in agent.log.read_text()
    assert code_of(server.BeginStep, begin("fresh", agent)) == grpc.StatusCode.OK  # room again


def _kv_shape(model: Path) -> tuple[int, int]:
    import json

    cfg = json.loads((model / "config.json").read_text())
    return cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
