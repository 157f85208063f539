"""The OpenAI-compatible API through the real `openai` SDK, against `potluck up` (real agents)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from server.text import TextModel
from tests.e2e.conftest import PotluckUp, potluck_command

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story about a fox."}]


def test_models_list_and_retrieve(client: OpenAI, potluck: PotluckUp, qwen_tiny: object) -> None:
    models = client.models.list().data
    assert len(models) == 1
    model = models[0]
    assert model.id == "qwen3_moe"  # the model folder's name by default
    assert model.object == "model" and model.owned_by == "potluck"
    assert client.models.retrieve(model.id).id == model.id


def test_health_reports_every_agent(base_url: str) -> None:
    reply = httpx.get(f"{base_url}/health")
    assert reply.status_code == 200
    agents = reply.json()["agents"]
    assert sorted(a["name"] for a in agents) == ["agent0", "agent1"] and all(a["up"] for a in agents)


def test_chat_completion(client: OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=8, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model_id and reply.system_fingerprint and reply.created > 0
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_with_usage(client: OpenAI, model_id: str) -> None:
    stream = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, finish, last = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert finish.choices[0].finish_reason in ("stop", "length") and finish.choices[0].delta.content is None
    assert last.choices == [] and last.usage is not None and 1 <= last.usage.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[1:-1])
    whole = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=6, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_chat_stream_wire_format(base_url: str, model_id: str) -> None:
    body = {"model": model_id, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"]
    assert "usage" not in payloads[-1]  # only with stream_options.include_usage


def test_completions_with_text_and_token_ids(client: OpenAI, model_id: str) -> None:
    text = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.id.startswith("cmpl-") and text.object == "text_completion"
    assert text.choices[0].finish_reason in ("stop", "length") and text.usage is not None
    ids = client.completions.create(model=model_id, prompt=[11, 12, 13, 14], max_tokens=5, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    default = client.completions.create(model=model_id, prompt="Once", temperature=0)
    assert default.usage is not None and default.usage.completion_tokens <= 16  # max_tokens defaults to 16


def test_completions_stream(client: OpenAI, model_id: str) -> None:
    chunks = list(client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in chunks[:-1])
    whole = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert streamed == whole.choices[0].text


def test_greedy_is_deterministic(client: OpenAI, model_id: str) -> None:
    texts = {
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=12, temperature=0)
        .choices[0].message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_seed_makes_sampling_reproducible(client: OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        reply = client.completions.create(model=model_id, prompt="The fox", max_tokens=12, temperature=1.0,
                                          top_p=0.95, seed=seed)  # fmt: skip
        return reply.choices[0].text

    assert sample(1234) == sample(1234)


def test_chat_logprobs(client: OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and reply.usage is not None
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for entry in content:
        assert entry.logprob <= 0 and all(0 <= b < 256 for b in entry.bytes or [])
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        # Greedy picks the most likely token.
        assert entry.token == entry.top_logprobs[0].token
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-4


def test_completion_logprobs(client: OpenAI, model_id: str) -> None:
    reply = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    n = len(logprobs.tokens)
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset or []) == n
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])


def test_stop_strings(client: OpenAI, model_id: str) -> None:
    full = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    # A 2-character piece from the middle whose first occurrence is where we found it.
    cut = next(k for k in range(len(text) // 3, len(text) - 2)
               if text.find(text[k:k + 2]) == k and text[k:k + 2].isprintable() and "\ufffd" not in text[k:k + 2])  # fmt: skip
    stop = text[cut : cut + 2]
    stopped = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=0,
                                        stop=[stop, "never-appears-anywhere"])  # fmt: skip
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_finishes_with_length(client: OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=HELLO, max_completion_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def eos_prompt(model_dir: Path) -> tuple[list[int], str, float]:
    """The one-token prompt whose greedy next token is an end-of-sequence id by the widest margin
    (logits of the reference model, transformers on the same checkpoint), that token's text and
    the margin."""
    import torch
    from transformers import AutoModelForCausalLM

    text = TextModel.load(model_dir)
    stops = sorted(text.stop_token_ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.arange(model.config.vocab_size).view(-1, 1)).logits[:, -1]  # [V, V]
    best_stop, which = logits[:, stops].max(dim=-1)  # [V], [V]
    logits[:, stops] = float("-inf")
    margin = best_stop - logits.max(dim=-1).values  # [V]: > 0 where greedy picks a stop id
    token = int(margin.argmax())
    return [token], text.token_text(stops[int(which[token])]), float(margin[token])


def test_ignore_eos_runs_to_max_tokens(client: OpenAI, model_id: str, qwen_tiny: Path) -> None:
    prompt, eos, margin = eos_prompt(qwen_tiny)
    assert margin > 0.1, f"no prompt of the tiny model makes greedy decoding end at once (margin {margin:.3f})"
    stopped = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0)
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage is not None and stopped.usage.completion_tokens == 1  # the end-of-sequence token
    ignoring = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    assert ignoring.choices[0].finish_reason == "length"
    assert ignoring.usage is not None and ignoring.usage.completion_tokens == 6
    logprobs = ignoring.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 6
    assert logprobs.tokens[0] == eos  # the end-of-sequence token, reported like any other
    # Chat too, streamed: every token up to max_tokens arrives.
    chunks = list(client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_metrics(client: OpenAI, model_id: str, base_url: str) -> None:
    client.completions.create(model=model_id, prompt="Once", max_tokens=3)
    text = httpx.get(f"{base_url}/metrics").text
    for name in (
        "potluck_time_to_first_token_seconds_bucket", "potluck_inter_token_latency_seconds_bucket",
        "potluck_e2e_request_latency_seconds_count", "potluck_prompt_tokens_total", "potluck_generation_tokens_total",
        'potluck_requests_total{endpoint="/v1/completions",status="200"}', "potluck_requests_running",
        "potluck_requests_waiting", 'potluck_agent_up{agent="agent0"} 1.0', "potluck_agent_expert_cache_hits_total",
        "potluck_agent_expert_cache_misses_total", "potluck_agent_expert_cache_loads_total",
        "potluck_agent_expert_cache_evictions_total", "potluck_agent_disk_read_bytes_total",
        "potluck_agent_link_sent_bytes_total", "potluck_agent_expert_cache_bytes",
        "potluck_agent_attention_seconds_total", "potluck_agent_expert_prefetches_total",
        "potluck_agent_prefetch_predicted_used_total", "potluck_agent_prefetch_used_total",
        "potluck_agent_prefetch_predicted_pairs_total", "potluck_agent_prefetch_pairs_total",
        "potluck_agent_compute_overrun_seconds_total", "potluck_agent_direct_expert_sends_total",
        'potluck_agent_early_expert_runs_total{agent="agent0",outcome="used"}',
        'potluck_agent_early_expert_runs_total{agent="agent0",outcome="dropped"}',
        "potluck_agent_local_expert_calls_total", "potluck_agent_remote_expert_calls_total",
        "potluck_agent_placement_reads_total", "potluck_migrations_total", "potluck_migration_bytes_total",
    ):  # fmt: skip
        assert name in text, name
    model = f'model_name="{model_id}"'
    for name in (  # request metrics carry the served model's name; one request finished by length
        f"potluck_time_to_first_token_seconds_count{{{model}}}", f"potluck_request_queue_time_seconds_count{{{model}}}",
        f"potluck_request_prefill_time_seconds_count{{{model}}}", f"potluck_request_decode_time_seconds_count{{{model}}}",
        f'potluck_request_success_total{{finished_reason="length",{model}}}', "potluck_build_info{",
    ):  # fmt: skip
        assert name in text, name
    build = next(line for line in text.splitlines() if line.startswith("potluck_build_info{"))
    assert 'version="' in build and model in build and build.endswith(" 1.0"), build


def test_admin_status(client: OpenAI, model_id: str, base_url: str) -> None:
    """`GET /admin/status` and `potluck status`, the table an admin reads, on the running cluster."""
    client.completions.create(model=model_id, prompt="Once", max_tokens=2)
    body = httpx.get(f"{base_url}/admin/status").json()
    assert body["model"] == model_id and {a["name"] for a in body["agents"]} == {"agent0", "agent1"}
    assert all(a["up"] and a["experts_held"] >= 0 for a in body["agents"])
    done = subprocess.run([*potluck_command(), "status", "--url", base_url], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"model {model_id} (potluck ") and lines[0].endswith("2 of 2 agents up"), lines[0]
    assert lines[1].split()[:3] == ["agent", "address", "state"]
    assert [line.split()[0] for line in lines[2:4]] == ["agent0", "agent1"] and all(" up " in x for x in lines[2:4])


def test_admin_stats_count_what_the_homes_routed(client: OpenAI, model_id: str, base_url: str) -> None:
    """`GET /admin/stats`: each home's decode steps report the experts their tokens chose; per MoE
    layer every token selects top_k experts, so a layer's counts add up to tokens x top_k."""
    def tokens() -> int:
        return sum(h["tokens"] for h in httpx.get(f"{base_url}/admin/stats").json()["homes"].values())

    before = tokens()
    client.completions.create(model=model_id, prompt="Once upon", max_tokens=6, extra_body={"ignore_eos": True})
    body = httpx.get(f"{base_url}/admin/stats").json()
    assert tokens() >= before + 5  # at least the 5 tokens decoded after the first
    assert body["window_s"] > 0 and body["homes"]
    for home in body["homes"].values():
        assert home["layers"] and all(len(layer["counts"]) == body["num_experts"] for layer in home["layers"])
        per_layer = {sum(layer["counts"]) for layer in home["layers"]}
        assert len(per_layer) == 1 and per_layer.pop() % home["tokens"] == 0  # tokens x top_k in every layer
        assert all(0 <= layer["entropy_bits"] <= math.log2(body["num_experts"]) for layer in home["layers"])


def test_admin_placement_and_replan(client: OpenAI, model_id: str, base_url: str) -> None:
    """`POST /admin/replan` re-plans from the statistics now; `GET /admin/placement` shows it."""
    client.completions.create(model=model_id, prompt="Once upon", max_tokens=4, user="alice")
    replanned = httpx.post(f"{base_url}/admin/replan", timeout=60).json()
    assert replanned["policy"] == "prism" and replanned["replans"] >= 1 and replanned["last"] is not None
    shown = httpx.get(f"{base_url}/admin/placement").json()
    assert shown["replans"] == replanned["replans"] and set(shown["agents"]) == {"agent0", "agent1"}
    assert all(layer.keys() == {"layer", "pinned", "cached", "loading"} for a in shown["agents"].values() for layer in a["layers"])
    cost = next(line for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                if line.startswith("potluck_placement_cost "))
    assert float(cost.split()[1]) >= 0, cost  # NaN until a re-plan set it
    unheld = next(line for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                  if line.startswith("potluck_experts_unheld "))
    assert float(unheld.split()[1]) >= 0, unheld  # the model is known once a request ran


def test_one_log_line_per_request_in_human_units(client: OpenAI, model_id: str, potluck: PotluckUp) -> None:
    """A finished request logs one line with its finish reason (not `cancelled`), streamed or not;
    the agents' start lines give sizes and rates for people."""
    done = client.completions.create(model=model_id, prompt="Once", max_tokens=3, extra_body={"ignore_eos": True})
    streamed = list(client.completions.create(model=model_id, prompt="Twice", max_tokens=3, stream=True,
                                              extra_body={"ignore_eos": True}))  # fmt: skip
    log = potluck.log_path.read_text(errors="replace")
    for request_id in (done.id, streamed[0].id):
        lines = [line for line in log.splitlines() if request_id in line]
        assert len(lines) == 1 and "finished:" in lines[0] and "finish_reason=length" in lines[0], lines
    starts = [line for line in log.splitlines() if ": serving on " in line and "potluck.agent" in line]
    assert len(starts) == 2 and all("expert memory unlimited, disk unlimited, link unlimited" in s for s in starts)
    assert "B/s" not in "".join(starts)
