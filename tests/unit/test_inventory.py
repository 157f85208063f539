"""Inventory files: validation names the field and node; conversion to NodeSpec and profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.types import NodeId, NodeSpec
from protos.messages import AgentInfo
from server.inventory import (InventoryError, NodeProfile, is_loopback, load_inventory, parse_inventory,
                              profile_mismatches, split_address, up_only_fields)
from server.cli import build_parser
from server.launcher import LocalAgents, launches_from_inventory

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def node(name: str = "a", address: str = "127.0.0.1:50051", **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": address, "expert_memory": "1GiB", **extra}


def test_local_default_inventory_is_two_loopback_agents() -> None:
    inventory = load_inventory(DEPLOY / "inventory.yaml")
    assert [n.address for n in inventory.nodes] == ["127.0.0.1:50051", "127.0.0.1:50052"]
    assert all(is_loopback(n.address) for n in inventory.nodes)
    assert inventory.profiles()[NodeId(inventory.nodes[0].name)] == NodeProfile(0, 0.0, 0.0)


def test_home_lan_example_loads_with_unlike_profiles() -> None:
    inventory = load_inventory(DEPLOY / "home-lan.example.yaml")
    assert len(inventory.nodes) == 4
    assert inventory.model is not None and inventory.model.is_absolute()
    memories = {n.expert_memory for n in inventory.nodes}
    links = {n.link_bandwidth for n in inventory.nodes}
    assert len(memories) == 4 and len(links) == 4 and 0 not in memories
    assert all(n.labels for n in inventory.nodes)


def test_compose_inventory_loads() -> None:
    assert [n.name for n in load_inventory(DEPLOY / "compose-inventory.yaml").nodes] == ["agent0", "agent1"]


def test_converts_to_node_specs_and_profiles() -> None:
    data = {"nodes": [node("pi", "[::1]:7000", disk_bandwidth="400MB/s", link_bandwidth="1Gbit/s",
                           labels=["arm64"])]}  # fmt: skip
    inventory = parse_inventory(data)
    assert inventory.node_specs() == (NodeSpec("pi", "[::1]:7000", ("arm64",)),)  # type: ignore[arg-type]
    assert inventory.profiles() == {"pi": NodeProfile(1024**3, 400e6, 125e6)}
    paced = parse_inventory({"nodes": [node("pi", "[::1]:7000", compute_share=0.3)]})
    assert paced.profiles()["pi"].compute_share == 0.3  # type: ignore[index]


def test_link_latency_reaches_the_launched_agents_command_line() -> None:
    inventory = parse_inventory({"nodes": [node(link_latency="2ms"), node("b", "127.0.0.1:50052")]})
    assert [n.profile.link_latency_s for n in inventory.nodes] == [0.002, 0.0]
    launches = launches_from_inventory(inventory, cores=2)
    command = LocalAgents(Path("/m"), launches).command(launches[0])
    args = build_parser().parse_args(command[3:])
    assert args.link_latency == pytest.approx(0.002)


def test_users_reach_the_node_specs() -> None:
    inventory = parse_inventory({"nodes": [node(users=["alice", "bob"]), node("b", "127.0.0.1:2")]})
    assert [spec.users for spec in inventory.node_specs()] == [("alice", "bob"), ()]


def test_relative_model_path_is_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"model": "models/m", "nodes": [node()]}))
    assert load_inventory(path).model == tmp_path / "models" / "m"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": [node(), node("pi", "127.0.0.1:x")]}, "nodes[1].address (node 'pi'): '127.0.0.1:x' is not host:port"),
        ({"nodes": [node(), node("b", "127.0.0.1:70000")]}, "nodes[1].address (node 'b')"),
        ({"nodes": [node(), node("a", "127.0.0.1:2")]}, "nodes[1].name: 'a' is already used by nodes[0]"),
        ({"nodes": [node(), node("b")]}, "nodes[1].address (node 'b'): '127.0.0.1:50051' is already used by nodes[0]"),
        ({"nodes": [node(users=["al"]), node("b", "127.0.0.1:2", users=["bo", "al"])]},
         "nodes[1].users (node 'b'): user 'al' is already listed by nodes[0]; a user has one home"),
        ({"nodes": [node(expert_memory="1GiX")]}, "nodes[0].expert_memory (node 'a'): invalid size '1GiX'"),
        ({"nodes": [node(disk_bandwidth="5MB")]}, "nodes[0].disk_bandwidth (node 'a'): invalid rate '5MB'"),
        ({"nodes": [node(link_bandwidth="fast")]}, "nodes[0].link_bandwidth (node 'a'): invalid rate 'fast'"),
        ({"nodes": [node(link_latency="2")]}, "nodes[0].link_latency (node 'a'): invalid duration '2': give a unit"),
        ({"nodes": [node(compute_share=3)]}, "nodes[0].compute_share (node 'a'): Input should be less than or equal to 1"),
        ({"nodes": [{"name": "a", "address": "127.0.0.1:1"}]}, "nodes[0].expert_memory (node 'a'): Field required"),
        ({"nodes": [node(colour="red")]}, "nodes[0].colour (node 'a'): unknown field (valid: name, address, "),
        ({"nodes": [node(name="bad name")]}, "nodes[0].name: 'bad name' is not a node name"),
        ({"nodes": []}, "nodes: at least one node is required"),
        ({}, "nodes: Field required"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_errors_name_field_and_node(data: Any, message: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, "inv.yaml")
    assert str(info.value).startswith("inv.yaml: ")
    assert message in str(info.value)


def test_every_error_is_shown_and_a_typo_gets_its_field() -> None:
    data = {"nodes": [{"name": "a", "adress": "127.0.0.1:1", "expert_memory": 0},
                      {"name": "b", "address": "127.0.0.1:99999", "expert_memroy": 0, "link_bandwidth": "fast"}]}
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, "inv.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "inv.yaml: 4 errors:"
    assert lines[1:] == [
        "  nodes[0].adress (node 'a'): unknown field; did you mean 'address'?",
        "  nodes[1].address (node 'b'): '127.0.0.1:99999' is not host:port (e.g. '192.168.1.20:50051', port 1-65535)",
        "  nodes[1].link_bandwidth (node 'b'): invalid rate 'fast': expected e.g. '50MB/s', '100Mbit/s', "
        "'800KiB/s' or 'unlimited'",
        "  nodes[1].expert_memroy (node 'b'): unknown field; did you mean 'expert_memory'?",
    ]  # the fields the typos leave missing are not reported again


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory(bad)


def test_split_address_and_loopback() -> None:
    assert split_address("[::1]:50051") == ("::1", 50051)
    assert split_address("agent0:50051") == ("agent0", 50051)
    assert is_loopback("127.0.0.2:1") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    # 192.0.2.0/24 is reserved for documentation (RFC 5737): never a real host.
    assert not is_loopback("192.0.2.10:50051")
    with pytest.raises(ValueError, match="'nope'"):
        split_address("nope")


def test_up_refuses_non_loopback_nodes_and_shares_cores() -> None:
    remote = parse_inventory({"nodes": [node(), node("lan", "192.0.2.10:50051")]})
    with pytest.raises(InventoryError, match=r"lan \(192\.0\.2\.10:50051\)"):
        launches_from_inventory(remote)
    local = parse_inventory({"nodes": [node(), node("b", "127.0.0.1:50052", expert_memory="2GiB")]})
    launches = launches_from_inventory(local, cores=2)
    assert [launch.torch_threads for launch in launches] == [1, 1]
    assert launches[1].profile.expert_memory_bytes == 2 * 1024**3
    assert launches_from_inventory(local, cores=16)[0].torch_threads == 8
    with pytest.raises(InventoryError, match=r"API's port: b \(127\.0\.0\.1:50052\)"):
        launches_from_inventory(local, avoid={50052})


def _info(**profile: Any) -> AgentInfo:
    base = {"memory_bytes": 0, "disk_bytes_per_s": 0.0, "link_bytes_per_s": 0.0, "link_latency_s": 0.0,
            "compute_share": 0.0}
    return AgentInfo(name=NodeId("pi"), model_type="qwen3_moe", num_layers=2, num_experts=4, vocab_size=64,
                     fingerprint="f", expert_bytes=1, max_positions=64, dense_layers=frozenset(), flops_per_s=1.0,
                     hidden_size=8, dtype_bytes=4, **{**base, **profile})


def test_a_running_agent_is_checked_against_its_inventory_profile() -> None:
    wants = NodeProfile(2 * 1024**3, 0.0, 125e6, 0.0, 0.002)
    assert profile_mismatches("pi", wants, _info(memory_bytes=2 * 1024**3, link_bytes_per_s=125e6,
                                                 link_latency_s=0.002)) == []  # fmt: skip
    lines = profile_mismatches("pi", wants, _info(link_bytes_per_s=1e9, compute_share=0.5))
    assert lines == [
        "agent pi runs with expert memory unlimited but the inventory gives it 2 GiB: restart it with --expert-memory "
        "2GiB, or fix the inventory",
        "agent pi runs with link bandwidth 1 GB/s but the inventory gives it 125 MB/s: restart it with "
        "--link-bandwidth 125MB/s, or fix the inventory",
        "agent pi runs with link latency 0 ms but the inventory gives it 2 ms: restart it with --link-latency 2ms, or "
        "fix the inventory",
        "agent pi runs with compute share 0.5 but the inventory gives it 0: restart it with --compute-share 0, or fix "
        "the inventory",
    ]
    # The suggested values parse back to what the inventory asks for.
    assert parse_inventory({"nodes": [node(expert_memory="2GiB", link_bandwidth="125MB/s", link_latency="2ms")]}
                           ).profiles()[NodeId("a")] == wants  # fmt: skip


def test_serve_names_the_fields_only_up_applies() -> None:
    inventory = parse_inventory({"nodes": [node(torch_threads=4), node("b", "127.0.0.1:50052")]})
    assert up_only_fields(inventory) == [
        "node a: torch_threads 4 applies to agents `potluck up` starts; start this agent with --torch-threads 4"]
