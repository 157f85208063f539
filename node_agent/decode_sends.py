"""Where a decode layer's work goes when its home lacks it: the experts it does not hold, to the
holders the routing table names (on the data plane where they publish one, else gRPC), or read
on the home when no other agent holds them, or split over several agents (slice i of m on the
i-th, the home's own slice here; each reads only its slice's bytes, and the home adds up the
partial outputs): those the scheduler's load balance chose for this home (`RoutingTable.runs`),
or without it every unheld one over every agent, as `RoutingTable.expert_split` says; and a
split-KV span's query, to the agents still holding its prompt's K/V.

    Decoder job (compute thread or event loop) --hand_over--> LayerSends.experts / .attention
        -> Dispatch.runs / .attends (futures) -> the step gathers them before the next layer
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from node_agent.attention import Compute
from node_agent.dataplane import DataClient
from node_agent.decode_attention import Partial
from node_agent.dispatch import ExpertCalls, Rows, only, routed_rows, rows_with
from node_agent.expert_buffer import ExpertBuffer
from node_agent.model import slots
from node_agent.peers import PeerFailed
from node_agent.read_ahead import MAX_AHEAD
from node_agent.state import KVShard
from protos.ids import ExpertId, NodeId, SliceId
from protos.routing import RoutingTable

log = logging.getLogger(__name__)

# A call that failed with one of these reached no holder (killed, its connection lost, or stopped
# past the data plane's keepalive): the home runs that work itself, reading what it lacks, and
# the step goes on. An error the holder answered with is the holder's, and fails the step.
UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})

# auto splits an unheld expert where the read it saves beats this many round trips: a split also
# costs every agent a call and a slice's compute, and a page-cached read's time varies (on the
# emulated LAN's unthrottled disks a 4.7 MB read measured near one 1 ms-latency round trip, and
# splitting took a token from 38 to 72 ms).
SPLIT_MARGIN = 2.0

# The home's own slices of a split layer: (layer, x, ids, weights, part, of) -> partial sum
# (ExpertExecutor.execute_slices).
RunSlices = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int], Awaitable[torch.Tensor]]

# A step of at most this many rows guesses its next layer's experts for the reads ahead.
GUESS_ROWS = 16

ReadAheadFn = Callable[[SliceId], Awaitable[None]]  # begin reading a slice guessed to be asked for next
T = TypeVar("T")


class DecodePeers(ExpertCalls, Protocol):
    """Expert and K/V calls to the peer `name` at `address` (its name goes into any error)."""

    async def fetch_kv(self, name: str, address: str, request_id: str, layer: int) -> KVShard: ...  # see HomeCaches
    async def attend(self, name: str, address: str, request_id: str, layer: int, q: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Dispatch:
    """The expert work a layer job hands back to the event loop: set from the compute thread
    through `call_soon_threadsafe`, so the sends start while the job runs the local experts."""

    inline: bool = False  # the job runs one layer on the event loop itself: hand work over by a direct call
    runs: list[asyncio.Future[Rows]] = field(default_factory=list)
    runs_pending: bool = False  # set on the compute thread when it hands work out (runs fill in later)
    remote: int = 0  # (expert, holder) runs sent to peers, slices included
    reads: int = 0  # experts no other agent holds, read here on demand (a split counts as remote)
    split: int = 0  # experts run in slices over the agents
    attends: list[asyncio.Future[tuple[int, Partial]]] = field(default_factory=list)  # split-KV: (span, partial)


class LayerSends:
    """A home's outbound decode work. `table` is the routing table the scheduler last published."""

    def __init__(self, name: str, buffer: ExpertBuffer, peers: DecodePeers, compute: Compute,
                 data: DataClient | None = None) -> None:
        self.name, self.buffer, self.peers, self.compute = name, buffer, peers, compute
        self.data = data  # the decode data plane to holders that publish one (else their gRPC RunExperts)
        self.table = RoutingTable()
        self.run_slices: RunSlices | None = None  # set by the agent once its executor exists
        self.expert_read_s: Callable[[], float] = lambda: 0.0  # one expert's read on this agent's disk
        self.round_trip_s: Callable[[], float] = lambda: 0.0  # a synchronous wait on peers, as measured
        self.read_ahead: ReadAheadFn | None = None  # begins reading one of my slices (the agent's executor)
        self._ahead_tasks: set[asyncio.Future[Any]] = set()
        self._may_split: tuple[RoutingTable | None, bool] = (None, False)
        # Holders a call could not reach, until the next table: their work runs here meanwhile.
        self._unreachable: tuple[RoutingTable | None, set[NodeId]] = (None, set())
        self.fallback_experts = 0  # (layer, expert) runs (slices too) of an unreachable holder run here

    def attention(self, dispatch: Dispatch, span: int, layer: int, q: torch.Tensor, request_id: str,
                  sources: Sequence[tuple[str, str]]) -> None:
        """On the event loop: a split span's query [1, H, hd] to every source of its prompt K/V."""
        for name, address in sources:
            attend = self.peers.attend(name, address, request_id, layer, q)
            dispatch.attends.append(asyncio.ensure_future(_part(span, attend)))

    def reads_ahead(self, rows: int) -> bool:
        """Whether a step of `rows` rows should guess its next layer's experts for their slices
        to be read ahead: a decode batch (not a prompt's chunk, which needs most experts anyway),
        with the decode prefetch on and a table that may split (worked out once per table; read
        by the compute thread)."""
        table = self.table
        if self._may_split[0] is not table:
            may = any(len(n) > 1 for n in table.runs.values()) if table.load_balance else bool(self._split_group())
            self._may_split = (table, may)
        return rows <= GUESS_ROWS and table.decode_prefetch and self._may_split[1]

    def experts(self, dispatch: Dispatch, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                experts: Sequence[int], ahead: Sequence[int] = ()) -> None:
        """On the event loop: the layer's experts not resident here, each to a holder in the
        routing table (one batch per holder), or read here if no other agent holds it, or split
        over the agents `_run_over` names (`_split`, one batch per agent). An expert
        run remotely is also read into free memory here (never evicting), so a home with room
        ends up running its requests' experts itself. `ahead`: the experts of the next layer the
        rows will likely choose; the slices the home would split them into begin to be read now,
        each agent told with this layer's first batch to it (`_ahead_of`)."""
        by_holder: dict[str, list[int]] = {}
        splits: dict[tuple[NodeId, ...], list[int]] = {}  # the agents of a split -> its experts
        group = self._split_group()
        always = self.table.expert_split == "always"
        worth = bool(group) and (always or self._split_pays(len(group)))
        for e in experts:
            eid = ExpertId(layer, e)
            remote = self.table.remote_holder(eid, self.name)
            over = self._run_over(eid, group, worth, always, remote)
            if len(over) > 1:
                splits.setdefault(over, []).append(e)
                continue
            if over:  # whole on the agent the load balance chose (a faster disk): it reads it
                remote = over[0] if over[0] != self.name else None
            if remote is not None:
                self.buffer.fill(eid)
            by_holder.setdefault(remote or self.name, []).append(e)
        hints = self._ahead_of(layer + 1, ahead, group, worth, always)
        if (own := hints.pop(NodeId(self.name), [])) and self.read_ahead is not None:
            task = asyncio.ensure_future(self._start_own(own))
            self._ahead_tasks.add(task)
            task.add_done_callback(self._ahead_tasks.discard)
        for over, es in splits.items():
            self._split(dispatch, over, layer, x, ids, weights, es, hints)
        for holder, es in by_holder.items():
            sub = only(ids, es)
            rows = routed_rows(sub)
            read: asyncio.Future[torch.Tensor] | None = None
            run: Awaitable[torch.Tensor]
            if holder == self.name:
                dispatch.reads += len(es)
                # A task of its own, cancelled with the run: should the step be cancelled before
                # `rows_with` first runs (its agent stopping), no coroutine is left never awaited.
                run = read = asyncio.ensure_future(self._load_and_run(layer, x[rows], sub[rows], weights[rows], es))
            else:
                dispatch.remote += len(es)
                here = functools.partial(self._load_and_run, layer, x[rows], sub[rows], weights[rows], es)
                run = self._or_here(NodeId(holder), len(es), here, layer, x[rows], sub[rows], weights[rows],
                                    ahead=hints.pop(NodeId(holder), []))
            dispatch.runs.append(outer := asyncio.ensure_future(rows_with(rows, run)))
            if read is not None:
                outer.add_done_callback(functools.partial(_cancel, read))
        for node, pieces in hints.items():  # agents given no work this layer: their slices alone
            self._tell(node, layer, x, ids, weights, pieces)

    def _run_over(self, eid: ExpertId, group: Sequence[NodeId], worth: bool, always: bool,
                  remote: NodeId | None) -> tuple[NodeId, ...]:
        """Where `eid` runs other than by default: split over these agents, slice i on the i-th;
        whole on the one agent named; () by default (its holder, else read here). With the load
        balance, the table's choice for this home (naming an agent it does not know: the
        default); without, a split over every agent where `expert_split` and `_split_pays` say so."""
        if self.run_slices is None:
            return ()
        if self.table.load_balance:
            over = self.table.runs.get(eid, ())
            return over if all(n == self.name or n in self.table.addresses for n in over) else ()
        return tuple(group) if worth and (remote is None or always) else ()

    def _ahead_of(self, layer: int, ahead: Sequence[int], group: Sequence[NodeId], worth: bool,
                  always: bool) -> dict[NodeId, list[SliceId]]:
        """Per agent, its slices of the guessed experts of `layer` that would be split (those
        this home holds, or a holder runs whole, have nothing to read ahead)."""
        out: dict[NodeId, list[SliceId]] = {}
        for e in ahead:
            eid = ExpertId(layer, e)
            if self.buffer.has(eid):
                continue
            over = self._run_over(eid, group, worth, always, self.table.remote_holder(eid, self.name))
            if len(over) > 1:
                for part, node in enumerate(over):
                    if len(got := out.setdefault(node, [])) < MAX_AHEAD:
                        got.append(SliceId(eid, part, len(over)))
        return out

    async def _start_own(self, pieces: Sequence[SliceId]) -> None:
        assert self.read_ahead is not None
        for piece in pieces:
            await self.read_ahead(piece)

    def _split_group(self) -> list[NodeId]:
        """Without the load balance, the agents a split runs on, slice i on the i-th (by name);
        none where the table says never, or no other agent is known."""
        if self.table.load_balance or self.table.expert_split == "never" or self.run_slices is None:
            return []
        group = sorted(self.table.addresses.keys() | {NodeId(self.name)})
        return group if len(group) > 1 else []

    def _split_pays(self, n: int) -> bool:
        """`auto`'s timing model for an expert no agent holds: read whole here, or a 1/n slice
        on each of n agents like this one at once, plus a round trip. Splitting pays where the
        read it saves is longer than the round trip: not for a page-cached file or an
        unthrottled disk."""
        return self.expert_read_s() * (1 - 1 / n) > SPLIT_MARGIN * self.round_trip_s()

    def _split(self, dispatch: Dispatch, group: Sequence[NodeId], layer: int, x: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, experts: Sequence[int], hints: dict[NodeId, list[SliceId]]) -> None:
        """Slice i of every expert in `experts` on group[i], one batch per agent (the home's own
        here); each result is a partial sum over the tokens' rows, added to h like any other."""
        assert self.run_slices is not None
        sub = only(ids, experts)
        rows = routed_rows(sub)
        xs, ids_, ws, of = x[rows], sub[rows], weights[rows], len(group)
        dispatch.split += len(experts)
        for part, node in enumerate(group):
            run: Awaitable[torch.Tensor]
            if node == self.name:
                run = self.run_slices(layer, xs, ids_, ws, part, of)
            else:
                dispatch.remote += len(experts)
                here = functools.partial(self.run_slices, layer, xs, ids_, ws, part, of)
                # Told once, with its first batch of the layer.
                run = self._or_here(node, len(experts), here, layer, xs, ids_, ws, part, of, hints.pop(node, []))
            dispatch.runs.append(asyncio.ensure_future(rows_with(rows, run)))

    def _call(self, node: NodeId, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              part: int = 0, of: int = 1, ahead: Sequence[SliceId] = ()) -> Awaitable[torch.Tensor]:
        """A batch to `node`: on its data plane where it publishes one, else its gRPC RunExperts."""
        data_address = self.table.data_addresses.get(node)
        if self.data is not None and data_address:
            return self.data.run_experts(node, data_address, layer, x, ids, weights, part, of, ahead)
        return self.peers.run_experts(node, self.table.addresses[node], "decode", layer, x, ids, weights,
                                      decode=True, part=part, of=of, read_ahead=ahead)

    def _or_here(self, node: NodeId, experts: int, here: Callable[[], Awaitable[torch.Tensor]], layer: int,
                 x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, part: int = 0, of: int = 1,
                 ahead: Sequence[SliceId] = ()) -> Awaitable[torch.Tensor]:
        """A batch of `experts` to `node` (`_call`: it leaves now), or `here()`, this agent running
        the same work, where `node` cannot be reached (`UNREACHABLE`): a holder that fails loses
        the step some time, not the request a replay."""
        if node in self._unreachable_now():
            self.fallback_experts += experts
            return here()
        return self._here_if_unreachable(node, experts, self._call(node, layer, x, ids, weights, part, of, ahead), here)

    async def _here_if_unreachable(self, node: NodeId, experts: int, call: Awaitable[torch.Tensor],
                                   here: Callable[[], Awaitable[torch.Tensor]]) -> torch.Tensor:
        try:
            return await call
        except PeerFailed as exc:
            if exc.code not in UNREACHABLE:
                raise
            unreachable = self._unreachable_now()
            if node not in unreachable:
                unreachable.add(node)
                log.warning("agent %s is unreachable (%s); its decode work runs here until the next routing table",
                            node, exc)
        self.fallback_experts += experts
        return await here()

    def _unreachable_now(self) -> set[NodeId]:
        """The holders found unreachable since the current table came (a new one starts afresh:
        the scheduler takes an agent that is down out of it, and puts it back once it answers)."""
        if self._unreachable[0] is not self.table:
            self._unreachable = (self.table, set())
        return self._unreachable[1]

    def _tell(self, node: NodeId, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              pieces: Sequence[SliceId]) -> None:
        """Slices to read ahead for an agent this layer gives no work: a batch of no rows that
        carries only them, not waited for (the step does not need its empty answer). A failure
        is left to the next call to that agent, which reports it."""
        if node not in self.table.addresses or node in self._unreachable_now():
            return
        task = asyncio.ensure_future(self._call(node, layer, x[:0], ids[:0], weights[:0], ahead=pieces))
        self._ahead_tasks.add(task)
        task.add_done_callback(self._ahead_tasks.discard)
        task.add_done_callback(_forget)

    async def _load_and_run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                            experts: Sequence[int]) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in experts:  # the buffer bounds memory: one at a time, each pinned while it runs
            async with self.buffer.pinned(ExpertId(layer, e)) as w:
                part = await self.compute(slots.mix_experts, x, ids, weights, {e: w})
                if part is not None:
                    out += part
        return out


def _cancel(inner: asyncio.Future[Any], _: object) -> None:
    inner.cancel()  # (done by then, as it is unless the run was cancelled first: a no-op)


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed hint is not worth a log line of its own


def hand_over(loop: asyncio.AbstractEventLoop, dispatch: Dispatch, fn: Callable[..., None], *args: object) -> None:
    """Have the event loop run fn(*args): now, when the job runs on the loop; else as soon as
    the loop wakes, while the compute thread goes on."""
    if dispatch.inline:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


async def gather(runs: list[asyncio.Future[T]]) -> list[T]:
    """Every run's rows; if one fails, the others are cancelled (none is left running)."""
    try:
        return list(await asyncio.gather(*runs))
    except BaseException:
        for run in runs:
            run.cancel()
        raise


async def _part(span: int, attend: Awaitable[Partial]) -> tuple[int, Partial]:
    return span, await attend
