"""The tokenizer of a generated checkpoint: byte-level BPE trained offline on `corpus.txt`, with
each family's special tokens and chat template (split from `synth.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

Arch = Literal["qwen3_moe", "mixtral"]

_HERE = Path(__file__).parent
# Special tokens in id order. Qwen3 puts them after the learned vocabulary; Mistral's
# SentencePiece vocabulary starts with <unk>=0, <s>=1, </s>=2. Both keep that here.
_SPECIALS: dict[Arch, tuple[str, ...]] = {
    "qwen3_moe": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "mixtral": ("<unk>", "<s>", "</s>"),
}


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def train_tokenizer(arch: Arch, vocab_size: int) -> Tokenizer:
    """Byte-level BPE on corpus.txt: any UTF-8 text round-trips. Deterministic, well under a second.

    The vocabulary reaches `vocab_size` unless the corpus runs out of merges (about 4.6k), in which
    case it is smaller and the extra embedding rows are padding, as in Qwen3's own checkpoints.
    """
    specials = _SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split regex
    tok.decoder = decoders.ByteLevel()
    # No normalizer: NFC or lowercasing would break the exact round trip.
    in_trainer = specials if arch == "mixtral" else ()  # Mixtral's come first (ids 0, 1, 2)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials) + len(in_trainer), special_tokens=list(in_trainer),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((_HERE / "corpus.txt").read_text(encoding="utf-8").splitlines(), trainer=trainer)
    if arch == "qwen3_moe":  # Qwen3's come right after the learned vocabulary
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    else:  # Mistral's prepends <s> to every encoded text. The chat template writes its own <s>,
        # so a rendered chat must be encoded with add_special_tokens=False (as transformers does).
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def special_ids(arch: Arch, tok: Tokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token in _SPECIALS[arch]:
        token_id = tok.token_to_id(token)
        assert token_id is not None, token  # invariant: train_tokenizer added every special token
        ids[token] = token_id
    return ids


def write_tokenizer(folder: Path, arch: Arch, tok: Tokenizer, max_positions: int) -> None:
    tok.save(str(folder / "tokenizer.json"))
    if arch == "qwen3_moe":
        special_map: dict[str, object] = {
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
        template = "chatml.jinja"
        absent: dict[str, object] = {"bos_token": None, "unk_token": None}  # Qwen3 has neither
    else:
        special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        template = "mistral.jinja"
        absent = {"pad_token": None}  # Mistral has no pad token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **absent, **special_map,
        "chat_template": (_HERE / template).read_text(encoding="utf-8"),
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": False,  # cleanup would break the exact round trip
        "add_prefix_space": False, "split_special_tokens": False,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special_map)


