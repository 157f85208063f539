"""Decode's control-plane decisions (pure): where a prompt is prefilled, which agent is a
request's home, and the routing table the home agents follow to reach the holders of the experts
they lack.

    prefill_at_home(prompt tokens, longest prompt a home prefills, agents, unheld experts' read time) -> bool
    user_home(OpenAI `user`, agents, users each agent lists) -> NodeId | None
    choose_home(agents, decoding per agent, K/V rows per agent, the user's home) -> NodeId
    routing_table(version, addresses, experts held per agent) -> RoutingTable (protos/routing.py)
    home_runs(profiles, latencies, measured paces, experts, holdings[, RunsMemo]) -> per home, where its missing experts run
    prompt_cache(prompts' expert counts, each agent's memory) -> per agent, experts to read and to give up
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace

from protos.ids import ExpertId, NodeId, SliceId
from protos.routing import ExpertSplit, RoutingTable
from scheduler.balance import Agent, Kind, Run, decode_runs, expert_kinds
from scheduler.cost_model import AgentProfile, CostModel
from scheduler.fill import holds_every


HOME_BATCH = 8  # requests decoding on one home before the next one goes to another agent


# What a sequence-parallel prefill step costs beyond its compute (every agent's control round
# trips per layer, the K/V exchange, the home's adoption): on this project's 2-core host, 4
# agents, the bench model, a 128-token prompt took 745 ms sequence-parallel against 199 ms on its
# home (docs/decode.md).
SEQUENCE_PARALLEL_OVERHEAD_S = 0.5


def prefill_at_home(prompt_tokens: int, home_max: int, agents: int, unheld_read_s: float) -> bool:
    """Whether a prompt is prefilled on its home, in decode steps (beside the running requests'
    tokens, its experts sent to their holders like theirs), rather than sequence-parallel on
    every agent. The home runs every token's attention and dense work; a sequence-parallel
    prefill splits them over the agents, and also the reads of experts that no agent holds (its
    token scheduling spreads them over every disk, where the home would read them all itself:
    `unheld_read_s` at its disk rate). At most `home_max` tokens go home (the compute the split
    would save stays small), and only while what spreading the reads would save stays under
    the sequence-parallel step's own overhead.

    A departure from splitting every prompt across the agents: for a short prompt the split's
    fixed cost is most of its TTFT (a 128-token prompt on 4 agents: 745 ms split, 199 ms at
    home), and prompts that arrive together could only be split one after the other, while on
    the home they share steps with each other and with the running requests."""
    if prompt_tokens > home_max:
        return False
    return unheld_read_s * (1 - 1 / max(agents, 1)) <= SEQUENCE_PARALLEL_OVERHEAD_S


def user_home(user: str | None, nodes: Sequence[NodeId], listed: Mapping[NodeId, Sequence[str]]) -> NodeId | None:
    """The home of a request from `user` (the OpenAI field), among the agents up: the one whose
    inventory entry lists the user; else the agent that ranks first for the user by rendezvous
    hashing (sha256 of user and agent name), so that a user keeps its home across requests and
    restarts, and only the users of an agent that leaves move. None without a user: the home is
    chosen by load (`choose_home`)."""
    if not user or not nodes:
        return None
    for node in nodes:
        if user in listed.get(node, ()):
            return node
    return max(nodes, key=lambda n: hashlib.sha256(f"{user}\0{n}".encode()).digest())


def choose_home(nodes: Sequence[NodeId], decoding: Mapping[NodeId, int], kv_rows: Mapping[NodeId, int],
                preferred: NodeId | None = None, batch: int = HOME_BATCH) -> NodeId:
    """Where a request decodes: its user's home (`preferred`, from `user_home`) when there is one
    among `nodes`; else with the other requests decoding (on the agent with the most of
    them that has fewer than `batch`), then on the one holding most of the prompt's K/V (the
    least to move to it), then the first in order; when every agent has a full batch, on the one
    with the fewest. A batched step streams the dense weights once for all its requests and sends
    each remote holder one batch per layer: on this project's host, 4 agents on an emulated LAN
    (1 Gbit/s, 1 ms), 8 streams packed on one home gave 34.3 tokens/s against 25.3 spread one per
    agent (4 streams: 25.6 against 24.9)."""
    if not nodes:
        raise ValueError("a request needs at least one agent to decode on")
    if preferred is not None and preferred in nodes:
        return preferred
    open_ = [n for n in nodes if decoding.get(n, 0) < batch]
    if not open_:
        return min(nodes, key=lambda n: (decoding.get(n, 0), nodes.index(n)))
    return min(open_, key=lambda n: (-decoding.get(n, 0), -kv_rows.get(n, 0), nodes.index(n)))


def data_address(address: str, port: int) -> str | None:
    """An agent's decode data plane: the host of its gRPC address, at the port it reports."""
    return f"{address.rpartition(':')[0]}:{port}" if port else None


def routing_table(version: int, addresses: Mapping[NodeId, str], held: Mapping[NodeId, frozenset[ExpertId]],
                  data_addresses: Mapping[NodeId, str] | None = None, expert_split: ExpertSplit = "auto",
                  decode_prefetch: bool = True, load_balance: bool = True) -> RoutingTable:
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
    data = {n: a for n, a in (data_addresses or {}).items() if n in held}
    return RoutingTable(version=version, addresses={n: a for n, a in addresses.items() if n in held},
                        data_addresses=data, holders=holders, expert_split=expert_split,
                        decode_prefetch=decode_prefetch, load_balance=load_balance)


# What a split costs beyond the model's link latencies, in the home's round trips: each peer's
# call and the home's sum of the partials, and a page-cached read's time varies (on the emulated
# LAN's unthrottled disks a 4.7 MB read measured near one 1 ms-latency round trip, and splitting
# on that took a token from 38 to 72 ms). The agents' own rule without the balance asks as much
# (node_agent/decode_sends.SPLIT_MARGIN: the saving beats two round trips).
SPLIT_OVERHEAD_ROUND_TRIPS = 1.0


@dataclass(frozen=True)
class Measured:
    """What an agent last reported of its own pace (CacheState)."""

    expert_read_s: float = 0.0  # one expert's read on its disk (0: unknown)
    round_trip_s: float = 0.0  # a synchronous wait on its decode peers


# A measured pace (an expert's read, a round trip) that moved by at most this share since the
# last table keeps the value that table used, so that the balance's answers for it still hold:
# a home's round trip differs at every poll, and every change made every home's table anew.
STEADY_SHARE = 0.25


class RunsMemo:
    """What `home_runs` worked out, kept from one table to the next (the scheduler publishes one
    at every poll): per home, the balance's run for each kind of expert (`balance.Kind`), while
    the agents' profiles and latencies, the mode and the split's overhead stay as they were;
    and the measured paces last used (`steady`). Kinds recur from table to table (most experts:
    held by one agent, or by none), so a table costs only the kinds new to it.

    Every home's table, timed with a one-off script on this project's 2-core host (48 layers x
    128 experts, 8 agents, half the experts held whole, 200 random slices held per agent): 2.9 s
    from nothing (a balance call per kind and home, pure Python, in the scheduler's process
    beside its event loop; before the memo, at every poll); 24 ms again with nothing changed; 74
    ms a poll later in which each agent read two slices and dropped two."""

    def __init__(self) -> None:
        self.measured: dict[NodeId, Measured] = {}
        self.homes: dict[NodeId, tuple[object, dict[Kind, list[Run]]]] = {}

    def steady(self, measured: Mapping[NodeId, Measured]) -> dict[NodeId, Measured]:
        """`measured`, with each value within STEADY_SHARE of the one used last kept as it was."""
        out = {}
        for node, now in measured.items():
            last = self.measured.get(node)
            out[node] = now if last is None else Measured(_steady(now.expert_read_s, last.expert_read_s),
                                                          _steady(now.round_trip_s, last.round_trip_s))
        self.measured = out
        return out

    def keep(self, homes: Set[NodeId]) -> None:
        """Forget the answers of agents no longer among the homes."""
        self.homes = {h: kept for h, kept in self.homes.items() if h in homes}

    def known(self, home: NodeId, context: object, most: int) -> dict[Kind, list[Run]]:
        """The answers kept for `home` if worked out in the same `context`, else none; dropped
        past `most` kinds (held slices come and go, and each pattern of them is a kind)."""
        got = self.homes.get(home)
        if got is None or got[0] != context or len(got[1]) > most:
            got = self.homes[home] = (context, {})
        return got[1]


def _steady(now: float, last: float) -> float:
    return last if abs(now - last) <= STEADY_SHARE * last else now


def home_runs(profiles: Mapping[NodeId, AgentProfile], latency_s: Mapping[NodeId, float],
              measured: Mapping[NodeId, Measured], cost: CostModel, experts: Sequence[ExpertId],
              held: Mapping[NodeId, frozenset[ExpertId]], slices: Mapping[NodeId, frozenset[SliceId]],
              mode: ExpertSplit, memo: RunsMemo | None = None) -> dict[NodeId, dict[ExpertId, tuple[NodeId, ...]]]:
    """For each agent as a home, where it runs the experts it lacks (`balance.decode_runs`), from
    the agents' profiles: a disk the throttle does not pace reads at the rate the agent measured
    (a page-cached file: about as fast as memory); a peer's one-way latency is the two ends'
    emulated latencies, or half the home's measured round trip where that is longer. With a
    `memo`, the measured paces are steadied and the answers of the tables before reused."""
    if mode == "never" or len(profiles) < 2:
        return {}
    if memo is not None:
        measured = memo.steady(measured)
        memo.keep(profiles.keys())
    disk = {n: p.disk_bytes_per_s or (cost.expert_bytes / m.expert_read_s
                                       if (m := measured.get(n, Measured())).expert_read_s > 0 else 0.0)
            for n, p in profiles.items()}
    out, kinds = {}, expert_kinds(experts, held, slices)
    for home in sorted(profiles):
        rt = measured.get(home, Measured()).round_trip_s
        agents = [Agent(replace(p, disk_bytes_per_s=disk[n]),
                        max((latency_s.get(home, 0.0) + latency_s.get(n, 0.0)) / 2, rt / 2))
                  for n, p in sorted(profiles.items())]
        overhead = SPLIT_OVERHEAD_ROUND_TRIPS * max(rt, 2 * max(a.latency_s for a in agents))
        context = (tuple((a.profile, a.latency_s) for a in agents), cost, mode, overhead)
        known = None if memo is None else memo.known(home, context, len(experts))
        out[home] = decode_runs(agents, home, cost, kinds, mode, overhead, known=known)
    return out


def same_holders(a: RoutingTable, b: RoutingTable) -> bool:
    """Whether two tables route alike (the version aside): no need to publish again."""
    return (a.addresses == b.addresses and a.data_addresses == b.data_addresses and a.holders == b.holders
            and a.expert_split == b.expert_split and a.decode_prefetch == b.decode_prefetch
            and a.load_balance == b.load_balance)


@dataclass(frozen=True)
class CacheRoom:
    """One agent's expert memory, as `prompt_cache` sees it."""

    held: frozenset[ExpertId]  # resident or being read
    placed: frozenset[ExpertId] = frozenset()  # the scheduler's placement: kept, never given up
    slots: int | None = None  # experts the memory holds (None: unlimited)


def prompt_cache(counts: Mapping[ExpertId, float], rooms: Mapping[NodeId, CacheRoom], routed: int
                 ) -> dict[NodeId, tuple[list[ExpertId], list[ExpertId]]]:
    """The dataset-free decode prefetch, pool-wide: the expert memory no placement keeps follows
    the prompts of the running requests. `counts`: how often their prefills chose each expert.
    Ranked as the home's own prefetch ranks them (round r takes every layer's r-th most chosen),
    the experts that fit in the pool's cache memory are the target: those no agent holds are
    read, spread over the disks (each to the agent with free room, else with the least valuable
    cache entry to give up, the fewest reads first), in place of cache entries outside the
    target, least chosen first. Each agent keeps one slot free of the target, for demand reads,
    as a placement does. Returns per agent (experts to read in order, entries to give up first);
    nothing where the pool already holds the target, or its memory holds every one of the
    model's `routed` experts (the fills put each in it, spread layer by layer, `scheduler/fill.py`:
    on the 4-agent LAN case, whose pool holds the model once, moving them took a token from 7.1 to
    7.7 round trips).

    On the bench model (16 experts top-2, half the experts pooled) the half of each layer's
    experts a request's own prompt chose most held 63% of its decode choices, against 50% for
    an unrelated prompt's half (docs/split.md); the home's memory alone is a quarter of the pool."""
    if not counts or holds_every((r.slots for r in rooms.values()), routed):
        return {}
    by_layer: dict[int, list[ExpertId]] = {}
    for eid in sorted(counts, key=lambda e: (-counts[e], e.layer, e.index)):
        if counts[eid] > 0:
            by_layer.setdefault(eid.layer, []).append(eid)
    ranked = [by_layer[layer][r] for r in range(max(map(len, by_layer.values()), default=0))
              for layer in sorted(by_layer) if r < len(by_layer[layer])]
    placed = frozenset().union(*(r.placed for r in rooms.values()))
    cache = {n: r.held - r.placed for n, r in rooms.items()}
    room = {n: max(0, (r.slots or 0) - 1 - len(r.placed)) for n, r in rooms.items()}
    target = [e for e in ranked if e not in placed][:sum(room.values())]
    wanted = set(target)
    held = frozenset().union(*cache.values()) | placed
    free = {n: room[n] - len(cache[n]) for n in rooms}
    spare = {n: sorted(cache[n] - wanted, key=lambda e: (counts.get(e, 0), e.layer, e.index), reverse=True)
             for n in rooms}  # popped from the end: the least chosen first
    out: dict[NodeId, tuple[list[ExpertId], list[ExpertId]]] = {}
    for eid in (e for e in target if e not in held):
        open_ = [n for n in sorted(rooms) if free[n] > 0 or spare[n]]
        if not open_:
            break
        node = min(open_, key=lambda n: (len(out.get(n, ((), ()))[0]), free[n] <= 0, n))
        loads, gone = out.setdefault(node, ([], []))
        if free[node] > 0:
            free[node] -= 1
        else:
            gone.append(spare[node].pop())
        loads.append(eid)
    return out
