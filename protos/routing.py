"""The routing table both ends share: which agents hold which experts, published by the
scheduler whenever placement changes and read by home agents to send decode tokens' expert work
straight to a holder (protos/convert.py puts it on the wire)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from protos.ids import ExpertId, NodeId

# How a home runs an expert it does not hold (`potluck up --expert-split`): auto splits one that
# no agent holds over the agents and runs a held one whole on its holder; never runs every
# expert whole (on a holder, else read whole by the home); always splits every one.
ExpertSplit = Literal["auto", "never", "always"]
EXPERT_SPLITS: tuple[ExpertSplit, ...] = ("auto", "never", "always")


@dataclass(frozen=True)
class RoutingTable:
    """A hint, never needed for correctness: a holder that has dropped an expert reads it again
    when asked to run it, and an expert no agent holds is read by the agent that needs it."""

    version: int = 0  # increases with every table the scheduler publishes
    addresses: dict[NodeId, str] = field(default_factory=dict)  # every agent a holder list names -> host:port
    data_addresses: dict[NodeId, str] = field(default_factory=dict)  # -> host:port of its decode data plane
    holders: dict[ExpertId, tuple[NodeId, ...]] = field(default_factory=dict)  # in order of preference
    expert_split: ExpertSplit = "auto"
    decode_prefetch: bool = True  # a home reads what a prompt it prefilled chose most before its decode
    # The load balance's choice for this home (scheduler/balance.py): an expert it does not hold
    # runs as slice i of len(nodes) on nodes[i], or whole on nodes[0] (one node, which reads it);
    # one not listed runs whole on its holder, else is read by the home. Without the balance
    # (load_balance False) the home splits as expert_split says, over every agent.
    runs: dict[ExpertId, tuple[NodeId, ...]] = field(default_factory=dict)
    load_balance: bool = True

    def remote_holder(self, eid: ExpertId, me: str) -> NodeId | None:
        """The first holder of `eid` other than `me` whose address is known (None: no other)."""
        return next((h for h in self.holders.get(eid, ()) if h != me and h in self.addresses), None)
