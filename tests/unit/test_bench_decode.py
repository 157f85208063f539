"""The decode benchmark's pure parts: stream gaps, medians, /metrics parsing, targets, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scheduler.types import AgentSnapshot, EngineSnapshot, NodeId
from server.bench_decode_io import IO_RUNS
from server.bench_decode_report import text_table, write_report
from server.bench_decode_stats import (COUNTERS_UNCHANGED_S, Arrival, DecodeCounters, StreamTiming, activity,
                                       aggregate_tokens_per_s, counters_settled, decoded_tokens, inter_token_gaps,
                                       lan_bound_s, round_trips_per_token, round_trips_per_token_over, summarize, targets,
                                       tokens_in_chunk)  # fmt: skip
from server.cli import build_parser
from server.inventory import parse_inventory
from server.launcher import launches_from_inventory
from server.metrics import ServerMetrics


def stream(sent: float, *chunks: tuple[float, int]) -> StreamTiming:
    return StreamTiming(sent, tuple(Arrival(t, k) for t, k in chunks))


def test_the_first_chunk_is_the_ttft_and_a_chunk_of_k_tokens_spreads_its_gap_over_them() -> None:
    arrivals = [Arrival(1.0, 1), Arrival(1.05, 1), Arrival(1.25, 2), Arrival(1.3, 1)]
    assert inter_token_gaps(arrivals) == pytest.approx([0.05, 0.1, 0.1, 0.05])
    assert inter_token_gaps(arrivals[:1]) == [] and inter_token_gaps([]) == []
    s = StreamTiming(0.5, tuple(arrivals))
    assert s.tokens == 5 and s.median_gap_s == pytest.approx(0.075) and s.last_s == 1.3
    assert stream(0.0, (1.0, 1)).median_gap_s is None  # one token: no inter-token time at all


def test_aggregate_rate_is_every_token_over_first_send_to_last_token() -> None:
    a = stream(0.0, (1.0, 1), (1.5, 1), (2.0, 1))
    b = stream(0.5, (1.2, 2), (4.0, 1))  # sent later, finished last
    assert aggregate_tokens_per_s([a, b]) == pytest.approx(6 / 4.0)
    assert aggregate_tokens_per_s([stream(0.0)]) is None and aggregate_tokens_per_s([]) is None


def test_chunks_count_the_tokens_their_logprobs_name() -> None:
    content = {"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"]}, "finish_reason": None}]}
    held = {"choices": [{"text": "", "logprobs": {"tokens": []}, "finish_reason": None}]}
    finish = {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"completion_tokens": 4}}
    plain = {"choices": [{"text": " x", "logprobs": None, "finish_reason": None}]}
    assert [tokens_in_chunk(c) for c in (content, held, finish, usage, plain)] == [2, 0, 0, 0, 1]


def metrics_text(agents: list[AgentSnapshot], running: int = 0) -> str:
    """/metrics as the real server renders it."""
    snap = EngineSnapshot(running=running, waiting=0, agents=tuple(agents))
    return ServerMetrics(lambda: snap).render().decode()


def agent(name: str, **counters: int) -> AgentSnapshot:
    return AgentSnapshot(NodeId(name), "127.0.0.1:1", True, **counters)  # type: ignore[arg-type]


def test_decode_counters_are_summed_over_agents_from_the_servers_own_metrics() -> None:
    before = DecodeCounters.from_metrics(metrics_text([agent("a"), agent("b")]))
    after = DecodeCounters.from_metrics(metrics_text([
        agent("a", decode_round_trips=300, decode_tokens=64, decode_steps=64),
        agent("b", decode_round_trips=20),
    ]))  # fmt: skip
    assert after == DecodeCounters(round_trips=320.0, tokens=64.0, steps=64.0)
    assert round_trips_per_token(before, after) == pytest.approx((320 + 64) / 64)


def test_round_trips_are_unknown_without_the_counters_or_without_decoded_tokens() -> None:
    old_server = "# TYPE potluck_requests_running gauge\npotluck_requests_running 0.0\n"
    missing = DecodeCounters.from_metrics(old_server)
    assert missing == DecodeCounters(None, None, None)
    assert round_trips_per_token(missing, missing) is None
    idle = DecodeCounters.from_metrics(metrics_text([agent("a")]))
    assert round_trips_per_token(idle, idle) is None  # decode ran elsewhere: nothing to divide


def test_round_trips_of_interleaved_rounds_add_up_each_round_s_scrapes() -> None:
    a, b, c, d = (DecodeCounters(t, n, n) for t, n in ((0.0, 0.0), (70.0, 10.0), (100.0, 50.0), (170.0, 60.0)))
    # Rounds 1 and 3 of a case (b - a, d - c) between which another case's round ran (c - b).
    assert round_trips_per_token_over([(a, b), (c, d)]) == (70 + 70 + 10 + 10) / 20
    assert round_trips_per_token_over([(a, b)]) == round_trips_per_token(a, b) == 8.0
    assert round_trips_per_token_over([(a, b), (c, None)]) is None  # a round whose counters never settled
    assert round_trips_per_token_over([(a, b), (DecodeCounters(None, 1.0, 1.0), d)]) is None
    assert round_trips_per_token_over([]) is None


def test_counters_settle_once_they_count_every_decoded_token_or_stop_changing() -> None:
    # Two rounds of two streams, 64 tokens each: each request's first token came from its prefill.
    rounds = [[stream(0.0, *((1.0 + i, 1) for i in range(64)))] * 2] * 2
    assert decoded_tokens(rounds) == 4 * 63 and decoded_tokens([[stream(0.0)]]) == 0
    before = DecodeCounters(round_trips=100.0, tokens=63.0, steps=63.0)
    stale = DecodeCounters(round_trips=400.0, tokens=63.0 + 3 * 63, steps=63.0 + 3 * 63)  # one refresh behind
    done = DecodeCounters(round_trips=500.0, tokens=63.0 + 4 * 63, steps=63.0 + 4 * 63)
    assert not counters_settled(before, stale, 4 * 63, unchanged_s=0.5)
    assert counters_settled(before, done, 4 * 63, unchanged_s=0.0)  # at once: nothing more to come
    # A count that never matches (a build that counts otherwise) settles once a refresh changed nothing.
    assert not counters_settled(before, stale, 4 * 63, unchanged_s=COUNTERS_UNCHANGED_S - 0.1)
    assert counters_settled(before, stale, 4 * 63, unchanged_s=COUNTERS_UNCHANGED_S)
    assert counters_settled(None, before, None, unchanged_s=COUNTERS_UNCHANGED_S)  # the scrape before: no count
    assert counters_settled(before, DecodeCounters(None, None, None), 4 * 63, 0.0)  # not exported: no wait
    # Counters that never settled give no figure, rather than one from a stale scrape.
    assert round_trips_per_token(before, None) is None and round_trips_per_token(None, done) is None
    assert round_trips_per_token(before, done) == pytest.approx((400 + 4 * 63) / (4 * 63))
    assert COUNTERS_UNCHANGED_S > 2.0  # longer than the server's refresh of agent counters


def test_activity_changes_while_agents_read_or_a_request_runs() -> None:
    quiet = activity(metrics_text([agent("a", bytes_read=10, bytes_used=10)]))
    assert quiet == activity(metrics_text([agent("a", bytes_read=10, bytes_used=10)]))
    assert quiet != activity(metrics_text([agent("a", bytes_read=20, bytes_used=20)]))
    assert activity(metrics_text([agent("a")], running=1))[-1] == 1


def case(kind: str, itl_ms: float, agents: int = 1, streams: int = 1, rate: float | None = None,
         trips: float | None = None) -> dict[str, Any]:
    gap = itl_ms / 1e3
    rounds = [[stream(0.0, *((0.1 + i * gap, 1) for i in range(64)))] * streams] * 3
    out = summarize(kind, agents, streams, rounds, trips)
    if rate is not None:
        out["aggregate_tokens_per_s"] = rate
    return out


def run_data(cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {"command": "potluck bench decode --rounds 3", "model": "/m/bench-qwen3_moe", "moe_layers": 8,
            "prompt_tokens": 128, "gen_tokens": 64, "rounds": 3, "threads": 2, "cores": 2, "expert_bytes_total": 6e8,
            "lan_agents": 4, "lan_expert_memory": 1.5e8, "link": "1Gbit/s", "link_latency_s": 0.001,
            "max_running": 8, "cases": cases, "min_tokens": min(c["min_tokens"] for c in cases)}


def test_summary_is_the_median_over_rounds_of_each_rounds_median() -> None:
    rounds = [[stream(0.0, (1.0, 1), (1.0 + g, 1), (1.0 + 2 * g, 1))] for g in (0.04, 0.05, 0.09)]
    rounds[1] = [StreamTiming(0.0, rounds[1][0].arrivals, "stop")]  # an end-of-sequence token ended it
    s = summarize("compute", 1, 1, rounds)
    assert s["median_itl_s"] == pytest.approx(0.05) and s["min_tokens"] == 3 and s["stopped"] == 1
    assert s["round_trips_per_token"] is None and len(s["rounds"]) == 3
    assert s["first_token_s"] == pytest.approx(1.0)


def test_first_token_is_the_last_streams_median_over_rounds() -> None:
    rounds = [[stream(0.0, (t, 1), (t + 0.05, 1)), stream(0.1, (t + 0.3, 1))] for t in (0.2, 0.5, 0.4)]
    s = summarize("streams", 4, 2, rounds)
    assert [r["first_token_s"] for r in s["rounds"]] == pytest.approx([0.4, 0.7, 0.6])  # the second stream's
    assert s["first_token_s"] == pytest.approx(0.6)
    assert stream(0.0).first_token_s is None


def test_targets_can_be_met_missed_or_not_measurable() -> None:
    cases = [case("transformers", 40.0), case("compute", 38.0), case("compute", 60.0, agents=4),
             case("lan", 60.0, agents=4, trips=9.5), case("streams", 60.0, 4, 1, rate=16.0),
             case("streams", 70.0, 4, 4, rate=36.0), case("streams", 90.0, 4, 8, rate=60.0)]
    data = run_data(cases)
    assert lan_bound_s(data) == pytest.approx(0.038 + 8 * 0.002)
    rows = {t.name: (t.measured, t.met) for t in targets(data)}
    assert rows["1 agent <= 1.0x transformers"] == ("0.95x", True)
    assert rows["4 agents <= 1.5x 1 agent"] == ("1.58x", False)
    assert rows["LAN <= 1.2x bound"] == ("1.11x", True)
    assert rows["LAN <= 10 round trips per token (MoE layers + 2)"] == ("9.5", True)
    assert rows["4 streams >= 2.5x the tokens/s of 1"] == ("2.25x", False)
    assert rows["8 streams >= 3.5x the tokens/s of 1"] == ("3.75x", True)
    cases[3]["round_trips_per_token"] = None  # a server without the decode counters
    assert ("n/a", None) in [(t.measured, t.met) for t in targets(data)]
    assert [t.name for t in targets(run_data(cases[1:2]))] == []  # nothing to compare with


def test_report_names_its_command_and_settings_and_never_says_nan(tmp_path: Path) -> None:
    cases = [case("transformers", 40.0), case("compute", 45.0), case("lan-compute", 50.0), case("lan", 70.0, agents=4),
             case("streams", 70.0, 4, 1, rate=14.0), case("streams", 80.0, 4, 2, rate=25.0)]
    cases[-1]["min_tokens"], cases[-1]["stopped"] = 37, 1  # a stream that met an end-of-sequence token
    data = {**run_data(cases), "stopped": 1, "versions": {"transformers": "5.25.0", "torch": "2.13.0+cpu"}}
    write_report(json.loads(json.dumps(data)), tmp_path)  # as read back from decode.json
    md = (tmp_path / "decode.md").read_text()
    assert "a 2-core host; transformers 5.25.0, torch 2.13.0+cpu." in md
    assert md.startswith("`potluck bench decode --rounds 3`") and "nan" not in md.lower()
    assert "| LAN | 4 | 1 | 70.0 |" in md and "| n/a |" in md and "1 Gbit/s" not in md and "1Gbit/s" in md
    assert "the fewest tokens a stream received was 37 of 64 (1 ended with an end-of-sequence token" in md
    assert "ignore_eos: an end-of-sequence token does not end a stream" in md
    assert "| 1 agent <= 1.0x transformers | 1.12x | missed |" in md
    # The bound's compute is one agent on a LAN agent's threads, where the run measured it apart.
    assert ("LAN bound: 1-agent compute per token on a LAN agent's threads + 8 MoE layers x one round trip "
            "(2 ms) = 66.0 ms.") in md
    assert "| compute-bound, 1 agent, a LAN agent's threads | 1 | 1 | 50.0 |" in md
    assert (tmp_path / "decode.png").stat().st_size > 0
    table = text_table(data)
    assert "compute-bound, 1 agent" in table and "missed" in table and "nan" not in table


def test_inventory_torch_threads_reach_the_agents_potluck_up_starts() -> None:
    inventory = parse_inventory({"nodes": [
        {"name": "a", "address": "127.0.0.1:50051", "expert_memory": 0, "torch_threads": 2},
        {"name": "b", "address": "127.0.0.1:50052", "expert_memory": 0},
    ]})  # fmt: skip
    threads = [launch.torch_threads for launch in launches_from_inventory(inventory, cores=2)]
    assert threads == [2, 1]  # b: its fair share of two cores


def test_decode_suite_flags_and_the_shared_rounds_default() -> None:
    args = build_parser().parse_args(["bench", "decode", "--cases", "compute", "--decode-agents", "1",
                                      "--lan-latency", "2ms"])  # fmt: skip
    assert args.suite == "decode" and args.rounds is None  # 3 for decode, 1 for prefill, set when run
    assert (args.prompt_tokens, args.gen_tokens, args.streams, args.lan_latency) == (128, 64, "1,2,4,8", 0.002)
    assert (args.io_agents, args.io_disk, args.lan_threads) == ("2,4", 200e6, 0)  # 0: the fair share
    args = build_parser().parse_args(["bench", "decode", "--io-disk", "50MB/s", "--io-agents", "4"])
    assert (args.io_agents, args.io_disk, args.lan_disk) == ("4", 50e6, 50e6)
    assert build_parser().parse_args(["bench", "decode", "--lan-disk", "20MB/s"]).lan_disk == 20e6


def test_the_lan_disk_case_is_reported_with_its_disk_and_no_target(tmp_path: Path) -> None:
    cases = [case("lan", 33.0, agents=4, trips=7.1), case("lan-disk", 41.0, 4, 1, rate=22.0),
             case("lan-disk", 64.0, 4, 4, rate=56.0)]
    data = {**run_data(cases), "lan_disk": 50e6, "lan_disk_streams": [1, 4]}
    write_report(json.loads(json.dumps(data)), tmp_path)
    md = (tmp_path / "decode.md").read_text()
    assert "| LAN with disks, 1 stream | 4 | 1 | 41.0 |" in md and "| LAN with disks, 4 streams | 4 | 4 | 64.0 |" in md
    assert "each agent's disk read at 50 MB/s and --max-running 4" in md
    assert [t.name for t in targets(data) if "disk" in t.name] == []  # a figure to compare, not a target


def test_the_io_case_reports_each_mode_its_bytes_and_the_split_target(tmp_path: Path) -> None:
    names = [name for name, *_ in IO_RUNS]
    cases = [case(f"io-{name}", itl, agents=n) for n, itls in ((2, (400.0, 250.0, 245.0, 240.0, 390.0, 242.0)),
                                                                (4, (390.0, 180.0, 170.0, 150.0, 380.0, 165.0)))
             for name, itl in zip(names, itls)]
    for c in cases:
        c["bytes_read_per_agent"] = {f"agent{i}": 1e8 * (i + 1) for i in range(c["agents"])}
        c["prefetch_hit_rate"] = 0.25 if "prefetch" in c["case"] else None
        c["read_ahead"], c["read_ahead_used"] = (40.0, 30.0) if "prefetch" in c["case"] else (0.0, 0.0)
    data = {**run_data(cases), "io_disk": 200e6, "io_pool": 3e8, "io_expert_token_s": 0.0002,
            "io_expert_read_s": 0.0236}
    write_report(json.loads(json.dumps(data)), tmp_path)
    md = (tmp_path / "decode.md").read_text()
    assert "| I/O-bound, 4 agents, split+balance+prefetch (--expert-split auto) | 4 | 1 | 150.0 |" in md
    assert "disk 200 MB/s each: reading one expert takes 23.6 ms, 118x its one-token compute (0.20 ms" in md
    assert "I/O-bound, 2 agents, whole (--expert-split never --no-decode-prefetch): 100, 200 MB" in md
    assert "I/O-bound, 4 agents, split (--expert-split auto --no-load-balance --no-decode-prefetch): 100" in md
    assert "I/O-bound, 4 agents, balance+prefetch (--expert-split never): 25%" in md
    assert "used / begun: I/O-bound, 2 agents, split+balance+prefetch (--expert-split auto): 30 / 40;" in md
    assert ("| I/O-bound, 4 agents: split + load balance + prefetch >= 2.4x faster per token than whole experts "
            "| 2.60x | met |" in md)
    assert "| I/O-bound, 4 agents: without prefetch >= 1.05x slower | 1.13x | met |" in md
    assert "| I/O-bound, 4 agents: without load balance >= 1.05x slower | 1.10x | met |" in md
    assert "| I/O-bound, 4 agents: without split >= 1.05x slower | 2.53x | met |" in md
    assert "nan" not in md.lower() and (tmp_path / "decode.png").stat().st_size > 0
    cases[9] = case("io-split+balance+prefetch", 175.0, agents=4)  # 2.23x and 0.97x: targets can be missed
    table = text_table({**data, "cases": cases})
    assert "2.23x     missed" in table and "0.97x     missed" in table
