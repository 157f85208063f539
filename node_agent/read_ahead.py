"""Slices a home expects to ask this agent for next: started early, used when asked for.

A home that splits its next layer's experts over the agents guesses them one layer ahead (the
next layer's router on this layer's hidden state, decode.py) and sends each agent its slices'
names with this layer's batch (`ExpertBatch.read_ahead`). The agent starts those reads at once,
behind its demand reads, so that a layer's reads overlap the previous layer's compute and round
trips rather than follow them. A wrong guess costs disk time, never a wrong result: the slice
asked for is read as before.

    ExpertBatch.read_ahead --start--> held in the buffer (room without evicting a whole expert),
                                      else a streamed read kept here (at most MAX_AHEAD)
    execute_slices --take--> that read (moved up to a demand read), or None: read as before
"""

from __future__ import annotations

from collections import OrderedDict

from node_agent.buffer_entries import PREFETCH, Entry
from node_agent.expert_buffer import ExpertBuffer
from protos.ids import SliceId

# Streamed read-aheads kept at once (their bytes are outside the buffer's budget, as a streamed
# slice's are while in use): two layers of top-2 guesses for a batch of two requests. The
# oldest is given up (its read dropped if not begun).
MAX_AHEAD = 8


class ReadAhead:
    def __init__(self, buffer: ExpertBuffer) -> None:
        self.buffer = buffer
        self._pending: OrderedDict[SliceId, Entry | None] = OrderedDict()  # None: held in the buffer
        self.started = 0  # reads begun on a guess
        self.used = 0  # of them, asked for

    async def start(self, key: SliceId) -> None:
        """Begin reading `key` unless it, or its whole expert, is held or on its way."""
        if key in self._pending or self.buffer.has(key) or self.buffer.has(key.expert):
            return
        if await self.buffer.prefetch(key, evict_whole=False):  # room, or only slices to evict
            self._pending[key] = None
        else:
            self._pending[key] = self.buffer.queue_stream(key, PREFETCH)
        self.started += 1
        while len(self._pending) > MAX_AHEAD:
            _, dropped = self._pending.popitem(last=False)
            if dropped is not None and not dropped.started:
                dropped.loaded.cancel()

    def take(self, key: SliceId) -> Entry | None:
        """The streamed read begun for `key`, if any (for `ExpertBuffer.stream`); a held one is
        found by the buffer itself."""
        if key not in self._pending:
            return None
        self.used += 1
        return self._pending.pop(key)
