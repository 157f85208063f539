"""Inventory files: validation names the field and node; conversion to NodeSpec and profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.types import NodeId, NodeSpec
from server.inventory import InventoryError, NodeProfile, is_loopback, load_inventory, parse_inventory, split_address
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
        ({"nodes": [node(expert_memory="1GiX")]}, "nodes[0].expert_memory (node 'a'): invalid size '1GiX'"),
        ({"nodes": [node(disk_bandwidth="5MB")]}, "nodes[0].disk_bandwidth (node 'a'): invalid rate '5MB'"),
        ({"nodes": [node(link_bandwidth="fast")]}, "nodes[0].link_bandwidth (node 'a'): invalid rate 'fast'"),
        ({"nodes": [node(link_latency="2")]}, "nodes[0].link_latency (node 'a'): invalid duration '2': give a unit"),
        ({"nodes": [node(compute_share=3)]}, "nodes[0].compute_share (node 'a'): Input should be less than or equal to 1"),
        ({"nodes": [{"name": "a", "address": "127.0.0.1:1"}]}, "nodes[0].expert_memory (node 'a'): Field required"),
        ({"nodes": [node(colour="red")]}, "nodes[0].colour (node 'a'): Extra inputs are not permitted"),
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
