"""Decode's control-plane decisions (pure): which agent is a request's home, and the routing
table the home agents follow to reach the holders of the experts they lack.

    choose_home(decoding per agent, K/V rows per agent)       -> NodeId
    routing_table(version, addresses, experts held per agent) -> RoutingTable (protos/routing.py)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protos.ids import ExpertId, NodeId
from protos.routing import RoutingTable


def choose_home(nodes: Sequence[NodeId], decoding: Mapping[NodeId, int], kv_rows: Mapping[NodeId, int]) -> NodeId:
    """The agent with the fewest requests decoding on it (their steps share its compute), then
    the one holding most of the prompt's K/V (the least to move to it), then the first in order."""
    if not nodes:
        raise ValueError("a request needs at least one agent to decode on")
    return min(nodes, key=lambda n: (decoding.get(n, 0), -kv_rows.get(n, 0), nodes.index(n)))


def routing_table(version: int, addresses: Mapping[NodeId, str], held: Mapping[NodeId, frozenset[ExpertId]]
                  ) -> RoutingTable:
    """Every held expert's holders. Where several agents hold one, the preferred holder rotates
    with the expert's index, so that homes lacking many experts spread their calls over the
    holders rather than all calling the first agent by name."""
    by_expert: dict[ExpertId, list[NodeId]] = {}
    for node in sorted(held):
        for eid in held[node]:
            by_expert.setdefault(eid, []).append(node)
    holders = {}
    for eid, nodes in by_expert.items():
        turn = eid.index % len(nodes)
        holders[eid] = tuple(nodes[turn:] + nodes[:turn])
    return RoutingTable(version, {n: a for n, a in addresses.items() if n in held}, holders)


def same_holders(a: RoutingTable, b: RoutingTable) -> bool:
    """Whether two tables route alike (the version aside): no need to publish again."""
    return a.addresses == b.addresses and a.holders == b.holders
