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
                   --drop_unasked--> the layer's other streamed guesses of that share, given up
                                     (a read in progress stops at its next chunk)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

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
        self.dropped = 0  # of them, given up when their layer was asked for without them

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
            if dropped is not None:
                dropped.loaded.cancel()  # (begun: it stops at its next chunk)

    def take(self, key: SliceId) -> Entry | None:
        """The streamed read begun for `key`, if any (for `ExpertBuffer.stream`); a held one is
        found by the buffer itself."""
        if key not in self._pending:
            return None
        self.used += 1
        return self._pending.pop(key)

    def drop_unasked(self, asked: Collection[SliceId]) -> None:
        """A home asked for `asked` (slices of one layer, one share of its experts): the streamed
        guesses of that layer and share it did not ask for were wrong, and their reads would only
        delay the reads still needed. Given up (a held one stays: it is in the cache)."""
        if not asked:
            return
        first = next(iter(asked))
        layer, part, of = first.expert.layer, first.part, first.of
        wrong = [k for k, v in self._pending.items()
                 if v is not None and k.expert.layer == layer and (k.part, k.of) == (part, of) and k not in asked]
        for key in wrong:
            entry = self._pending.pop(key)
            assert entry is not None
            entry.loaded.cancel()
        self.dropped += len(wrong)
