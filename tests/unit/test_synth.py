"""`init_model` writes checkpoints that transformers loads exactly as published Qwen3-MoE / Mixtral ones.

Everything here is real: real files in tmp_path, real `transformers` and `tokenizers`, no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from node_agent.model.synth import MIN_VOCAB_SIZE, PRESETS, init_model, topic_groups, topic_ranges

ARCHS = ("qwen3_moe", "mixtral")
TINY = PRESETS["tiny"]
# Published per-expert names: (router prefix, gate, up, down) of each architecture.
MOE_NAMES = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
}
TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t\nand a second line\r\n",
    "Grüße aus Zürich: crème brûlée costs 7,50 € (naïve façade).",
    "Привет, こんにちは, 你好, مرحبا, שלום 🙂🚀 — e=mc² ≈ π/2 ∑",
    "<|im_start|> is plain text for Mixtral; [INST] too.",
    "",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import, which already happened above.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per architecture, seed 0; the tests below only read them."""
    return {arch: init_model(arch, tmp_path_factory.mktemp(arch) / "ckpt") for arch in ARCHS}  # type: ignore[arg-type]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def expected_shapes(arch: str, layers: int = TINY.layers, experts: int = TINY.experts) -> dict[str, tuple[int, ...]]:
    """The published tensor names and shapes, written out independently of synth.py."""
    D, I, V, hd = TINY.hidden_size, TINY.intermediate_size, TINY.vocab_size, TINY.head_dim
    q, kv = TINY.heads * hd, TINY.kv_heads * hd
    moe, gate, up, down = MOE_NAMES[arch]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
                                          "lm_head.weight": (V, D)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                   f"{p}.self_attn.q_proj.weight": (q, D), f"{p}.self_attn.k_proj.weight": (kv, D),
                   f"{p}.self_attn.v_proj.weight": (kv, D), f"{p}.self_attn.o_proj.weight": (D, q),
                   f"{p}.{moe}.gate.weight": (experts, D)}
        if arch == "qwen3_moe":
            shapes |= {f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)}
        for e in range(experts):
            x = f"{p}.{moe}.experts.{e}"
            shapes |= {f"{x}.{gate}.weight": (I, D), f"{x}.{up}.weight": (I, D), f"{x}.{down}.weight": (D, I)}
    return shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_hold_one_tensor_per_expert_per_projection(arch: str, ckpt: dict[str, Path]) -> None:
    folder = ckpt[arch]
    tensors = read_tensors(folder)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected_shapes(arch)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-0000{TINY.shards}.safetensors" for k in range(1, TINY.shards + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {n for n, where in index["weight_map"].items() if where == file} == set(f.keys())
    # Some layer straddles a shard boundary, as in real checkpoints: readers must follow the index.
    files_of_layer = [{f for n, f in index["weight_map"].items() if n.startswith(f"model.layers.{i}.")}
                      for i in range(TINY.layers)]
    assert any(len(f) > 1 for f in files_of_layer)


def test_single_shard_writes_model_safetensors_without_index(tmp_path: Path) -> None:
    out = init_model("mixtral", tmp_path / "m", shards=1, layers=1)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert set(read_tensors(out)) == set(expected_shapes("mixtral", layers=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_it_as_published(arch: str, ckpt: dict[str, Path]) -> None:
    config = AutoConfig.from_pretrained(ckpt[arch])
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == (arch, TINY.experts, 2)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    raw = json.loads((ckpt[arch] / "config.json").read_text())
    # transformers 4.x reads these keys (5.x reads rope_parameters and aliases num_experts).
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"]
    assert raw["num_experts" if arch == "qwen3_moe" else "num_local_experts"] == TINY.experts

    loaded = AutoModelForCausalLM.from_pretrained(ckpt[arch], dtype=torch.float32, output_loading_info=True)
    model, info = cast(tuple[Any, dict[str, object]], loaded)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    tok = AutoTokenizer.from_pretrained(ckpt[arch])
    ids = torch.tensor([tok("The weather this spring has been strange.").input_ids])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_router_logits=True)
    assert out.logits.shape == (1, ids.shape[1], TINY.vocab_size)
    assert torch.isfinite(out.logits).all()
    # Numerically interesting: logits spread (std ~2 by design), the residual stream neither
    # vanishes nor explodes, and every layer routes the prompt to several different experts.
    assert 1.0 < out.logits.std().item() < 4.0
    assert all(0.5 < h.pow(2).mean().sqrt().item() < 4.0 for h in out.hidden_states)
    for router_logits in out.router_logits:
        assert router_logits.topk(2, dim=-1).indices.unique().numel() >= 4


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_weights_equal_the_files(arch: str, ckpt: dict[str, Path]) -> None:
    """transformers 5 stacks experts on load: gate_up_proj[e] = cat(gate_e, up_e), down_proj[e] = down_e."""
    files = read_tensors(ckpt[arch])
    state = AutoModelForCausalLM.from_pretrained(ckpt[arch], dtype=torch.float32).state_dict()
    moe, gate, up, down = MOE_NAMES[arch]
    seen: set[str] = set()
    for i in range(TINY.layers):
        fused = f"model.layers.{i}.mlp.experts"  # Mixtral's block_sparse_moe is renamed to mlp
        x = f"model.layers.{i}.{moe}.experts"
        gate_up = torch.stack([torch.cat([files[f"{x}.{e}.{gate}.weight"], files[f"{x}.{e}.{up}.weight"]])
                               for e in range(TINY.experts)])  # [E, 2I, D], gate rows first
        torch.testing.assert_close(state[f"{fused}.gate_up_proj"], gate_up, rtol=0, atol=0)
        downs = torch.stack([files[f"{x}.{e}.{down}.weight"] for e in range(TINY.experts)])  # [E, D, I]
        torch.testing.assert_close(state[f"{fused}.down_proj"], downs, rtol=0, atol=0)
        seen |= {f"{fused}.gate_up_proj", f"{fused}.down_proj"}
    for name, tensor in files.items():
        if ".experts." not in name:
            loaded = name.replace(".block_sparse_moe.", ".mlp.")
            torch.testing.assert_close(state[loaded], tensor, rtol=0, atol=0)
            seen.add(loaded)
    assert seen == set(state)  # nothing in the model came from anywhere but the files


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_and_matches_raw_tokenizers(arch: str, ckpt: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt[arch])
    raw = Tokenizer.from_file(str(ckpt[arch] / "tokenizer.json"))
    assert len(tok) == raw.get_vocab_size() == TINY.vocab_size
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert ids == raw.encode(text, add_special_tokens=False).ids  # transformers kept the pipeline
    bos = tok("hi").input_ids[0]
    assert (bos == tok.bos_token_id == 1) if arch == "mixtral" else tok.bos_token_id is None


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_is_a_single_id(arch: str, ckpt: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt[arch])
    eos = "<|im_end|>" if arch == "qwen3_moe" else "</s>"
    assert tok.eos_token == eos and isinstance(tok.eos_token_id, int)
    assert tok(eos, add_special_tokens=False).input_ids == [tok.eos_token_id]
    assert AutoConfig.from_pretrained(ckpt[arch]).eos_token_id == tok.eos_token_id
    gen_eos = GenerationConfig.from_pretrained(ckpt[arch]).eos_token_id
    assert tok.eos_token_id in (gen_eos if isinstance(gen_eos, list) else [gen_eos])


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Why is the sky blue?"},
]
EXPECTED_CHAT = {
    "qwen3_moe": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                 "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
                 "<|im_start|>assistant\n",
    "mixtral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Why is the sky blue? [/INST]",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template(arch: str, ckpt: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt[arch])
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED_CHAT[arch]
    # Tokenized, the template's own <s> is the only BOS (no second one from the post-processor).
    ids = tok(text, add_special_tokens=False).input_ids
    if arch == "mixtral":
        assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 1
    else:
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path, ckpt: dict[str, Path]) -> None:
    again = init_model("qwen3_moe", tmp_path / "again", seed=0)
    other = init_model("qwen3_moe", tmp_path / "other", seed=1)
    first = ckpt["qwen3_moe"]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) == sorted(p.name for p in other.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    base, changed = read_tensors(first), read_tensors(other)
    assert all(not torch.equal(base[n], changed[n]) for n in base)
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_overrides_and_bfloat16(tmp_path: Path) -> None:
    out = init_model("qwen3_moe", tmp_path / "m", hidden_size=32, layers=1, experts=4, experts_per_token=1,
                     intermediate_size=16, vocab_size=300, dtype="bfloat16", shards=3)
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok,
            config.moe_intermediate_size, config.vocab_size) == (32, 1, 4, 1, 16, 300)
    assert config.head_dim == 32 // TINY.heads
    tensors = read_tensors(out)
    assert len(list(out.glob("model-*-of-00003.safetensors"))) == 3
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (32, 16)
    assert len(AutoTokenizer.from_pretrained(out)) <= 300


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"experts_per_token": 9}, "experts_per_token=9"),
        ({"experts": 1}, "experts=1"),
        ({"hidden_size": 66}, "hidden_size=66"),
        ({"hidden_size": 36}, "head_dim=9"),  # 36 / 4 heads: odd, RoPE needs pairs
        ({"vocab_size": MIN_VOCAB_SIZE - 1}, f"vocab_size={MIN_VOCAB_SIZE - 1}"),
        ({"layers": 0}, "layers=0"),
        ({"intermediate_size": -32}, "intermediate_size=-32"),
        ({"shards": 10_000}, "shards=10000"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"arch": "llama"}, "arch='llama'"),
        ({"preset": "huge"}, "preset='huge'"),
    ],
)
def test_invalid_arguments_raise_value_error_quoting_the_value(
    tmp_path: Path, kwargs: dict[str, object], quoted: str
) -> None:
    args: dict[str, object] = {"arch": "qwen3_moe", "out": tmp_path / "m"} | kwargs
    with pytest.raises(ValueError, match=re.escape(quoted)):
        init_model(**args)  # type: ignore[arg-type]
    assert not (tmp_path / "m").exists()


def test_refuses_a_non_empty_folder_and_fills_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="full"):
        init_model("mixtral", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    init_model("mixtral", tmp_path / "empty", layers=1)
    assert (tmp_path / "empty" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no partial folders left


def test_progress_reports_every_layer(tmp_path: Path) -> None:
    lines: list[str] = []
    init_model("qwen3_moe", tmp_path / "m", progress=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("layer ")] == [
        f"layer {i}/{TINY.layers}" for i in range(1, TINY.layers + 1)
    ]
    assert sum(line.startswith("wrote model-") for line in lines) == TINY.shards


def _own_group_share(folder: Path, topics: int) -> list[list[float]]:
    """Per topic and MoE layer, the share of its tokens' top-k choices in its own expert group
    (transformers' own routers, on 64 tokens drawn from the topic's vocabulary range)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    ranges, groups = topic_ranges(cfg.vocab_size, topics), topic_groups(cfg.num_experts, topics)
    g, shares = torch.Generator().manual_seed(0), []
    for tokens, group in zip(ranges, groups):
        ids = torch.randint(tokens.start, tokens.stop, (1, 64), generator=g)
        with torch.no_grad():
            router_logits = model(ids, output_router_logits=True).router_logits
        top = [logits.topk(cfg.num_experts_per_tok, -1).indices for logits in router_logits]
        shares.append([((t >= group.start) & (t < group.stop)).float().mean().item() for t in top])
    return shares


def _answers_in_range(folder: Path, topics: int) -> list[float]:
    """Per topic, the share of 32 tokens sampled (temperature 1, seeded) after a prompt from the
    topic's range that stay in that range."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g, shares = torch.Generator().manual_seed(1), []
    for r, tokens in enumerate(topic_ranges(model.config.vocab_size, topics)):
        ids = torch.randint(tokens.start, tokens.stop, (1, 16), generator=g)
        torch.manual_seed(r)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 attention_mask=torch.ones_like(ids))  # fmt: skip
        answer = out[0, ids.shape[1]:]
        shares.append(((answer >= tokens.start) & (answer < tokens.stop)).float().mean().item())
    return shares


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_topics_make_each_vocabulary_range_prefer_its_expert_group(tmp_path: Path, arch: str) -> None:
    topical = init_model(arch, tmp_path / "topics", "tiny", topics=2)  # type: ignore[arg-type]
    plain = init_model(arch, tmp_path / "plain", "tiny")  # type: ignore[arg-type]
    assert json.loads((topical / "config.json").read_text())["potluck_topics"] == 2
    with_topics, without = _own_group_share(topical, 2), _own_group_share(plain, 2)
    mean = [sum(layers) / len(layers) for layers in with_topics]
    assert min(mean) > 0.85, with_topics  # half the experts take most of each topic's choices
    assert max(sum(layers) / len(layers) for layers in without) < 0.75, without  # no topics: about half
    # The answers stay on their prompt's topic (the lm_head's topic rows), and so choose its experts too.
    assert min(_answers_in_range(topical, 2)) > 0.9
    assert sum(plain_shares := _answers_in_range(plain, 2)) / 2 < 0.75, plain_shares  # no topics: about half
    with pytest.raises(ValueError, match="topics"):
        init_model(arch, tmp_path / "bad", "tiny", topics=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topics"):
        init_model(arch, tmp_path / "bad", "tiny", topics=9)  # type: ignore[arg-type]
