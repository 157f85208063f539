"""The node inventory: which agents the server drives, where they listen, what each may give.

    inventory = load_inventory(Path("deploy/inventory.yaml"))    # raises InventoryError
    inventory.node_specs()       # -> tuple[NodeSpec, ...] for scheduler.service.start_engine
    inventory.profiles()         # -> {NodeId: NodeProfile} for agents started by `potluck up`

The YAML shape (see deploy/home-lan.example.yaml):

    model: /srv/models/Qwen3-30B-A3B     # optional; relative paths are from this file's folder
    nodes:
      - name: laptop                     # unique; the agent's NodeId
        address: 192.168.1.20:50051      # host:port of its gRPC server; unique
        expert_memory: 12GiB             # SIZE; "unlimited" or 0 for no budget
        disk_bandwidth: 2GB/s            # RATE, optional (default unlimited)
        link_bandwidth: 1Gbit/s          # RATE, optional (default unlimited)
        link_latency: 2ms                # DURATION, optional: emulate a link's one-way delay
                                         # (local benchmarks; default 0, none)
        compute_share: 0.3               # optional: emulate a slower processor, a fraction of one
                                         # host core (local benchmarks; default: not paced)
        torch_threads: 2                 # optional: torch threads of an agent `potluck up` starts
                                         # (default: a fair share of the host's cores)
        labels: [gpu, laptop]            # optional, free-form
        users: [alice]                   # optional: requests whose OpenAI `user` is listed decode
                                         # on this node (a user on at most one node)

Every error names the field and the node, e.g. `nodes[1].address (node 'pi'): ...`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.types import NodeId, NodeSpec
from protos.messages import AgentInfo
from server.units import UnitError, format_rate, format_size, parse_duration, parse_rate, parse_size

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class InventoryError(ValueError):
    """The inventory file is missing, not YAML, or fails validation; the message says where."""


@dataclass(frozen=True)
class NodeProfile:
    """What one agent may give (0 = unlimited), as passed to `potluck agent`."""

    expert_memory_bytes: int  # expert buffer budget, bytes
    disk_bytes_per_s: float  # expert store read bandwidth, bytes/s
    link_bytes_per_s: float  # link bandwidth, each direction, bytes/s
    compute_share: float = 0.0  # emulated compute, fraction of one host core (benchmarks)
    link_latency_s: float = 0.0  # emulated one-way delay of each message the agent sends, seconds


def _size(value: Any) -> int:
    try:
        return parse_size(value)
    except UnitError as exc:
        raise ValueError(str(exc)) from None


def _rate(value: Any) -> float:
    try:
        return parse_rate(value)
    except UnitError as exc:
        raise ValueError(str(exc)) from None


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise ValueError(str(exc)) from None


Size = Annotated[int, BeforeValidator(_size)]
Rate = Annotated[float, BeforeValidator(_rate)]
Duration = Annotated[float, BeforeValidator(_duration)]


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `[v6]:port`; ValueError quoting the address if malformed."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r} is not host:port (e.g. '192.168.1.20:50051', port 1-65535)")
    return host, int(port_text)


def is_loopback(address: str) -> bool:
    """True when `address`'s host is this machine (127.0.0.0/8, ::1 or 'localhost')."""
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def profile_mismatches(name: str, expected: NodeProfile, info: AgentInfo) -> list[str]:
    """What an agent started by hand reports against what the inventory gives it, one line each
    (`serve` cannot apply a profile: each agent takes its own flags)."""
    def line(what: str, flag: str, has: str, wants: str) -> str:
        return (f"agent {name} runs with {what} {has} but the inventory gives it {wants}: restart it with "
                f"{flag} {wants.replace(' ', '')}, or fix the inventory")

    lines = []
    if info.memory_bytes != expected.expert_memory_bytes:
        lines.append(line("expert memory", "--expert-memory", format_size(info.memory_bytes),
                          format_size(expected.expert_memory_bytes)))
    for what, flag, has, wants in (("disk bandwidth", "--disk-bandwidth", info.disk_bytes_per_s, expected.disk_bytes_per_s),
                                   ("link bandwidth", "--link-bandwidth", info.link_bytes_per_s, expected.link_bytes_per_s)):
        if not math.isclose(has, wants, rel_tol=1e-6):
            lines.append(line(what, flag, format_rate(has), format_rate(wants)))
    if not math.isclose(info.link_latency_s, expected.link_latency_s, rel_tol=1e-6, abs_tol=1e-9):
        lines.append(line("link latency", "--link-latency", f"{info.link_latency_s * 1e3:g} ms",
                          f"{expected.link_latency_s * 1e3:g} ms"))
    if not math.isclose(info.compute_share, expected.compute_share, rel_tol=1e-6):
        lines.append(line("compute share", "--compute-share", f"{info.compute_share:g}", f"{expected.compute_share:g}"))
    return lines


def up_only_fields(inventory: Inventory) -> list[str]:
    """Lines for the fields `serve` cannot check against a running agent (it reports no thread
    count): only `potluck up`, which starts the agents, applies them."""
    return [f"node {n.name}: torch_threads {n.torch_threads} applies to agents `potluck up` starts; start this "
            f"agent with --torch-threads {n.torch_threads}" for n in inventory.nodes if n.torch_threads is not None]


class NodeEntry(BaseModel):
    """One node of the inventory, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    address: str
    expert_memory: Size
    disk_bandwidth: Rate = 0.0
    link_bandwidth: Rate = 0.0
    link_latency: Duration = 0.0
    compute_share: float = Field(0.0, ge=0, le=1)
    # torch intra-op threads of an agent that `potluck up` starts (remote agents take their own
    # --torch-threads); None: a fair share of this host's cores. For benchmarks that give every
    # agent the thread count of a baseline.
    torch_threads: int | None = Field(None, ge=1)
    labels: tuple[str, ...] = ()
    users: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a node name (letters, digits, '.', '_', '-'; at most 63)")
        return name

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        split_address(address)
        return address

    @property
    def profile(self) -> NodeProfile:
        return NodeProfile(self.expert_memory, self.disk_bandwidth, self.link_bandwidth, self.compute_share,
                           self.link_latency)


class Inventory(BaseModel):
    """A whole inventory: the model folder (optional) and at least one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path | None = None
    nodes: tuple[NodeEntry, ...]

    @field_validator("nodes")
    @classmethod
    def _check_not_empty(cls, nodes: tuple[NodeEntry, ...]) -> tuple[NodeEntry, ...]:
        # Checked here rather than with Field(min_length=1), which pydantic also reports
        # (confusingly) whenever one node is invalid.
        if not nodes:
            raise ValueError("at least one node is required")
        return nodes

    @model_validator(mode="after")
    def _check_unique(self) -> Inventory:
        for key in ("name", "address"):
            seen: dict[str, int] = {}
            for index, node in enumerate(self.nodes):
                value = getattr(node, key)
                if value in seen:
                    raise _DuplicateError(index, key, f"{value!r} is already used by nodes[{seen[value]}]")
                seen[value] = index
        homes: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for user in node.users:
                if user in homes and homes[user] != index:
                    raise _DuplicateError(index, "users", f"user {user!r} is already listed by nodes[{homes[user]}]; "
                                                          f"a user has one home")
                homes[user] = index
        return self

    def node_specs(self) -> tuple[NodeSpec, ...]:
        return tuple(NodeSpec(NodeId(n.name), n.address, n.labels, n.users) for n in self.nodes)

    def profiles(self) -> dict[NodeId, NodeProfile]:
        return {NodeId(n.name): n.profile for n in self.nodes}


class _DuplicateError(ValueError):
    # Raised inside the model validator, so pydantic reports it at the top level; we keep where
    # it belongs (index, field) to name the node in the message.
    def __init__(self, index: int, key: str, message: str) -> None:
        super().__init__(message)
        self.index, self.key, self.message = index, key, message


def parse_inventory(data: Any, source: str = "inventory", base_dir: Path | None = None) -> Inventory:
    """Validate already-loaded YAML data; relative `model` paths are resolved from `base_dir`."""
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: expected a mapping with a 'nodes' list, got {type(data).__name__}")
    try:
        inventory = Inventory.model_validate(data)
    except ValidationError as exc:
        raise InventoryError(f"{source}: {_describe(exc, data)}") from None
    if inventory.model is not None and base_dir is not None and not inventory.model.is_absolute():
        inventory = inventory.model_copy(update={"model": base_dir / inventory.model})
    return inventory


def load_inventory(path: Path) -> Inventory:
    """Read and validate an inventory file; InventoryError names the file, field and node."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: not valid YAML: {exc}") from None
    return parse_inventory(data, str(path), path.parent)


def _describe(exc: ValidationError, data: dict[str, Any]) -> str:
    """Every error, one per line, as `nodes[1].address (node 'pi'): message`; a misspelt field
    name gets the closest valid one, and the field it leaves missing is not reported twice."""
    errors = exc.errors()
    misspelt = {tuple(e["loc"][:-1]): _closest(list(e["loc"])) for e in errors if e["type"] == "extra_forbidden"}
    lines = []
    for error in errors:
        loc, message = list(error["loc"]), error["msg"].removeprefix("Value error, ")
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _DuplicateError):
            loc, message = ["nodes", cause.index, cause.key], cause.message
        if error["type"] == "missing" and tuple(loc[:-1]) in misspelt.keys() and loc[-1] in misspelt.values():
            continue  # said with its misspelling
        if error["type"] == "extra_forbidden":
            guess = _closest(loc)
            message = f"unknown field; did you mean {guess!r}?" if guess else \
                f"unknown field (valid: {', '.join(_fields(loc))})"
        lines.append(f"{_where(loc, data)}: {message}")
    return lines[0] if len(lines) == 1 else f"{len(lines)} errors:\n  " + "\n  ".join(lines)


def _fields(loc: list[Any]) -> list[str]:
    model = NodeEntry if len(loc) >= 3 and loc[0] == "nodes" else Inventory
    return list(model.model_fields)


def _closest(loc: list[Any]) -> str | None:
    """The valid field name nearest to the unknown one at `loc` (None if none is close)."""
    close = difflib.get_close_matches(str(loc[-1]), _fields(loc), n=1, cutoff=0.6)
    return close[0] if close else None


def _where(loc: list[Any], data: dict[str, Any]) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
        nodes = data.get("nodes")
        node = nodes[loc[1]] if isinstance(nodes, list) and loc[1] < len(nodes) else None
        if isinstance(node, dict) and isinstance(node.get("name"), str) and loc[2:] != ["name"]:
            path += f" (node {node['name']!r})"
    return path or "inventory"
