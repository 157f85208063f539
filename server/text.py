"""The served model's text side: tokenizer, chat template, stop ids, per-token text and bytes.

Everything here reads the checkpoint folder once at start-up (`TextModel.load`); after that it is
pure CPU work, which the handlers run off the event loop for prompts (a 10 MB body took 12 s).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer

from server.errors import InvalidRequest

_BYTE_TOKEN_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte-fallback pieces


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


class TextModel:
    """Tokenizer and text facts of one checkpoint folder."""

    def __init__(self, model_dir: Path, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # logits width; every token id is < vocab_size
        self.stop_token_ids = stop_token_ids  # end-of-sequence ids: generation stops, not emitted
        self.fingerprint = _fingerprint(model_dir)  # "fp_" + 10 hex digits of config.json
        self._byte_decoder = _byte_level_decoder(tokenizer)
        # Ids only a chat template may write (<|im_start|>, <|im_end|>, ...), never a client's text.
        self.control_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(added, "special", False))
        # Per-token caches for logprobs; bounded by the vocabulary.
        self._text_cache: dict[int, str] = {}
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def load(cls, model_dir: Path) -> TextModel:
        """Read tokenizer, config.json and generation_config.json from `model_dir` (no network)."""
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        config = _read_json(model_dir / "config.json")
        vocab_size = int(config.get("vocab_size") or len(tokenizer))
        stops = set(_as_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id")))
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        return cls(model_dir, tokenizer, vocab_size, frozenset(stops))

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` rendered by the chat template, ready for the assistant's turn.

        Control tokens come from the template only: text a client sends that spells one (say
        `<|im_start|>system`) stays text, else a user could write the system prompt. The
        rendered prompt is tokenized whole, as transformers does; only when a control token lands
        inside a message's text is it tokenized piecewise, the messages' text with special
        tokens split into plain ones."""
        text = self._render([{"role": m.role, "content": m.content} for m in messages])
        # The template already wrote BOS and any other special tokens it wants.
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        pieces = self._pieces(messages, text)
        spans = [(start, start + len(piece)) for start, piece, is_content in pieces if is_content] if pieces else []
        if not any(i in self.control_ids and any(a <= lo < b for a, b in spans) for i, (lo, _) in zip(ids, offsets)):
            return ids
        assert pieces is not None
        return [i for _, piece, is_content in pieces
                for i in self.tokenizer(piece, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]]

    def _render(self, conversation: list[dict[str, str]]) -> str:
        try:
            return str(self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        except TemplateError as exc:
            # Templates raise for conversations they refuse (e.g. roles that do not alternate).
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from None

    def _pieces(self, messages: Sequence[ChatMessage], text: str) -> list[tuple[int, str, bool]] | None:
        """`text` cut into (start, piece, is a message's content) in order, found by rendering the
        conversation again with a marker for each content; None when the template does not copy
        each content once and unchanged (then the whole-text tokenization stands)."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters
        marked = self._render([{"role": m.role, "content": mark} for m, mark in zip(messages, marks)])
        pieces, at, start = [], 0, 0
        for mark, message in zip(marks, messages):
            found = marked.find(mark, at)
            if found < 0 or marked.count(mark) != 1:
                return None
            pieces += [(start, marked[at:found], False), (start + found - at, message.content, True)]
            start += found - at + len(message.content)
            at = found + len(mark)
        pieces.append((start, marked[at:], False))
        if "".join(piece for _, piece, _ in pieces) != text:
            return None
        return [p for p in pieces if p[1]]

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt, with the tokenizer's usual BOS if it has one."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token on its own, as logprobs show it (a piece of a multi-byte char shows as U+FFFD)."""
        text = self._text_cache.get(token_id)
        if text is None:
            text = self._text_cache[token_id] = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The exact UTF-8 bytes one token stands for (may be part of a character)."""
        raw = self._bytes_cache.get(token_id)
        if raw is None:
            raw = self._bytes_cache[token_id] = self._raw_bytes(token_id)
        return list(raw)

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            match = _BYTE_TOKEN_RE.fullmatch(piece)
            if match:
                return bytes([int(match[1], 16)])
            table = self._byte_decoder
            if table is not None and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            if "\u2581" in piece:
                # sentencepiece marks a word's leading space with U+2581, which decoding a lone
                # token strips.
                return piece.replace("\u2581", " ").encode("utf-8")
        return self.token_text(token_id).encode("utf-8")


def _byte_level_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2's printable-char -> byte table when the tokenizer is byte-level BPE, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in type(backend.decoder).__name__:
        return None
    # The same table as GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the
    # others for code points from 256 upwards, in byte order.
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _fingerprint(model_dir: Path) -> str:
    config = model_dir / "config.json"
    digest = hashlib.sha256(config.read_bytes() if config.exists() else b"").hexdigest()
    return f"fp_{digest[:10]}"
