"""How a request leaves the continuous-batching loop (batching.py's `Batcher` derives from this):
its tokens handed to the consumer in order, its end after a stop token or its last token, a
failure replayed on the agents left (an agent that failed) or passed to the consumer, and the
release of its state on the agents once no step with it is in flight."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence

from scheduler.agent_calls import AgentCalls
from scheduler.batch_state import Seq
from scheduler.client import AgentClient
from scheduler.errors import AgentFailed, NoAgentsAvailable
from scheduler.runner import ClusterView, RequestRunner
from scheduler.types import NodeId, TokenEvent

log = logging.getLogger("potluck.scheduler")

MAX_REPLAYS = 3  # failures one request survives; a fourth ends it with the error

ClusterFn = Callable[[], tuple[Sequence[AgentClient], ClusterView | None]]  # the agents up now, and their view
FailedFn = Callable[[NodeId, str], None]  # an agent failed (name, why): take it out of the cluster now


class BatchEnds:
    # The loop's state these methods share with Batcher, which sets it.
    cluster: ClusterFn
    on_agent_failed: FailedFn | None
    waiting: deque[Seq]
    running: list[Seq]
    calls: AgentCalls
    _wake: asyncio.Event
    _outbox: list[tuple[Seq, TokenEvent | BaseException | None]]
    _releases: set[asyncio.Task[None]]

    def _emit(self, seq: Seq, event: TokenEvent) -> TokenEvent:
        seq.tokens.append(event.token_id)
        self._outbox.append((seq, event))
        return event

    def _flush(self) -> None:
        """Hand the consumers what was sampled (or ended) since the last flush, in order."""
        for seq, item in self._outbox:
            seq.out.put_nowait(item)
        self._outbox.clear()

    def _done(self, seq: Seq, event: TokenEvent) -> bool:
        """End the request after a stop token or its last token; returns whether it ended."""
        if event.is_stop or seq.produced >= seq.request.sampling.max_tokens:
            self._finish(seq, None)
            return True
        return False

    def agent_down(self, name: NodeId, why: str) -> None:
        """`name` is down: every call waiting on it is abandoned, and every running request that
        uses it is replayed at once, without waiting for its calls to fail (a stopped agent's hung
        for a minute)."""
        self.calls.abandon(name)
        for seq in list(self.running):
            if name in seq.members or (seq.home is not None and seq.home.name == name):
                self._failed(seq, AgentFailed(why, name), seq.epoch)

    def _failed(self, seq: Seq, error: BaseException, epoch: int) -> None:
        """A step of `seq`'s run `epoch` failed: if an agent failed, the engine hears of it and
        the request is replayed on the agents left (see the module's docstring); else it ends with
        the error. A failure of a run already replayed is old news."""
        if seq.ended or seq.epoch != epoch:
            return
        dead = error.agent if isinstance(error, AgentFailed) and error.down else None
        if dead is not None and self.on_agent_failed is not None:
            self.on_agent_failed(NodeId(dead), str(error))  # may replay it already (agent_down)
        if seq.ended or seq.epoch != epoch:
            return
        if dead is None or seq.cancelled or seq.epoch >= MAX_REPLAYS:
            self._finish(seq, error)
            return
        agents, _ = self.cluster()
        if not [a for a in agents if a.name != dead]:
            self._finish(seq, NoAgentsAvailable(f"no agent left to serve the request: {error}"))
            return
        log.warning("request %s: replaying it on the agents left (%d tokens produced) after: %s", seq.request.request_id,
                    seq.produced, error)
        old_rid, old_runner, old_members = seq.rid, seq.runner, [n for n in seq.members if n != dead]
        if old_runner is not None and old_members:
            self._track(asyncio.create_task(_forget(old_runner, old_rid, old_members)))
        seq.begin_replay()
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)  # first in line, on the agents up now
        self._wake.set()

    def _finish(self, seq: Seq, error: BaseException | None) -> None:
        """Out of the loop; its consumer hears the end (or the error); every agent holding its
        state releases it in the background, once no step with it is in flight."""
        if seq in self.running:
            self.running.remove(seq)
        self._outbox.append((seq, error))
        seq.ended = True
        self._release_ended(seq)

    def _release_ended(self, seq: Seq) -> None:
        if seq.in_flight or seq.released:
            return  # the home still runs a step with it (its reply comes back here), or done
        seq.released = True
        if seq.runner is None:
            seq.gone.set()
            return
        task = self._release(seq, seq.members)
        task.add_done_callback(lambda _: seq.gone.set())

    def _release(self, seq: Seq, nodes: Sequence[NodeId]) -> asyncio.Task[None]:
        assert seq.runner is not None
        return self._track(asyncio.create_task(seq.runner.release(seq.rid, list(nodes))))

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task


async def _forget(runner: RequestRunner, rid: str, nodes: Sequence[NodeId]) -> None:
    """Release the state of a run replaced by a replay on the agents that may hold it; an agent
    that does not answer drops it at its time to live."""
    try:
        await runner.release(rid, list(nodes))
    except Exception as exc:  # the replay goes on regardless
        log.info("releasing %s after a failure: %s", rid, exc)
