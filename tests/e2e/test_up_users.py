"""`potluck up --inventory` takes the inventory's users and labels to the server: a request of a
user a node lists decodes on that node, and the status view shows the labels."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from server.launcher import free_port
from tests.e2e.conftest import start_up


def test_up_routes_a_listed_user_to_its_node(qwen_tiny: Path, tmp_path: Path) -> None:
    nodes = [{"name": f"agent{i}", "address": f"127.0.0.1:{free_port()}", "expert_memory": 0, "labels": [f"l{i}"],
              "users": [user]} for i, user in enumerate(("alice", "bob"))]  # fmt: skip
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"nodes": nodes}))
    up = start_up(qwen_tiny, tmp_path, "--inventory", str(inventory))
    try:
        status = httpx.get(f"{up.url}/admin/status", timeout=10).json()
        assert {a["name"]: a["labels"] for a in status["agents"]} == {"agent0": ["l0"], "agent1": ["l1"]}
        client = up.client()
        client.completions.create(model=qwen_tiny.name, prompt="Once upon", max_tokens=4, user="bob")
        homes = httpx.get(f"{up.url}/admin/stats", timeout=10).json()["homes"]
        assert set(homes) == {"agent1"}, homes
    finally:
        assert up.stop() == 0
