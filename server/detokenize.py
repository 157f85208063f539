"""Pure text logic of generation: token ids -> text pieces, and stop strings.

    detok = Detokenizer(text_model.decode, prompt_ids)
    stops = StopBuffer(["\\n\\n", "END"])
    for token_id in generated:
        safe = stops.push(detok.push(token_id))   # text that may be sent to the client now
        if stops.matched: break                   # the stop string itself is never emitted
    safe += stops.push(detok.flush()) + stops.flush()   # at the end, whatever was held back

Neither class touches I/O; both are tested on real tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) a whole UTF-8 char


class Detokenizer:
    """Incremental detokenization that never emits part of a UTF-8 character.

    Decoding one token at a time is wrong for two reasons: byte-level tokens may hold part of a
    multi-byte character (decoded alone they give U+FFFD), and sentencepiece-style decoders drop
    a token's leading space when it starts the decoded text. So each step decodes a short window
    of ids twice (without and with the new token) and emits the difference once it no longer
    ends in U+FFFD. The window starts with the last prompt tokens, so the first output token is
    decoded in context (the approach of Hugging Face TGI).
    """

    CONTEXT_TOKENS = 6  # prompt tokens kept as left context; enough for any word boundary

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self._prefix = 0  # window start: ids before it are emitted and no longer needed
        self._read = len(self._ids)  # ids before this index are emitted as text

    def push(self, token_id: int) -> str:
        """Text that `token_id` completes; "" while it ends inside a multi-byte character."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(emitted) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character decodes to U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :] if len(text) > len(emitted) else ""


class StopBuffer:
    """Cuts generated text at the first stop string, holding back what could start one.

    Invariant: the text released so far never ends with a proper prefix of a stop string, so a
    match always lies entirely within the pending text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""  # received but not yet released
        self.matched: str | None = None  # the stop string found; nothing more is released after it

    def push(self, text: str) -> str:
        """The part of the text received so far that can be released now."""
        if self.matched is not None:
            return ""
        pending = self._pending + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            index = pending.find(stop)
            if index >= 0 and (first is None or index < first[0]):
                first = (index, stop)
        if first is not None:
            self.matched, self._pending = first[1], ""
            return pending[: first[0]]
        held = self._held_length(pending)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held]

    def flush(self) -> str:
        """Release what was held back (generation ended without a stop string)."""
        text, self._pending = ("" if self.matched is not None else self._pending), ""
        return text

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
