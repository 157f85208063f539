"""`potluck status`'s view of a cluster, from an engine snapshot: the JSON and the table."""

from __future__ import annotations

from scheduler.types import AgentSnapshot, EngineSnapshot, NodeId
from server.status import cluster_status, status_table


def test_status_json_and_table() -> None:
    snapshot = EngineSnapshot(running=2, waiting=1, agents=(
        AgentSnapshot(NodeId("laptop"), "192.168.1.20:50051", True, frozenset({0, 1, 5}), hits=3, misses=1,
                      bytes_used=3 * 1024**2, capacity_bytes=4 * 1024**3, bytes_read=3 * 1024**2, bytes_sent=2048,
                      requests=2, labels=("gpu",), placed=frozenset({0, 5})),
        AgentSnapshot(NodeId("pi"), "192.168.1.21:50051", False, problem="unreachable (connection refused)"),
    ))  # fmt: skip
    status = cluster_status(snapshot, "qwen3-30b", "0.1.0")
    assert status["running"] == 2 and status["waiting"] == 1
    laptop, pi = status["agents"]
    assert laptop == {"name": "laptop", "address": "192.168.1.20:50051", "labels": ["gpu"], "up": True, "problem": "",
                      "expert_memory_used_bytes": 3 * 1024**2, "expert_memory_budget_bytes": 4 * 1024**3,
                      "experts_held": 3, "experts_pinned": 2, "hit_rate": 0.75, "disk_read_bytes": 3 * 1024**2, "link_sent_bytes": 2048,
                      "requests": 2}  # fmt: skip
    assert pi["up"] is False and pi["hit_rate"] is None and pi["problem"] == "unreachable (connection refused)"
    lines = status_table(status).splitlines()
    assert lines[0] == "model qwen3-30b (potluck 0.1.0): 2 running, 1 waiting; 1 of 2 agents up"
    assert lines[1].split() == ["agent", "address", "state", "expert", "memory", "experts", "hit", "rate", "read",
                                "sent", "requests"]  # fmt: skip
    assert lines[2].split() == ["laptop", "192.168.1.20:50051", "up", "3", "MiB", "/", "4", "GiB", "3", "(2",
                                "pinned)", "75.0%", "3", "MiB", "2", "KiB", "2"]  # fmt: skip
    assert lines[3].split()[:3] == ["pi", "192.168.1.21:50051", "DOWN"]
    assert lines[4] == "pi is down: unreachable (connection refused)"
