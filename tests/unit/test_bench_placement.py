"""The placement benchmark's figures from its measurements: per-request latencies, the share of
expert calls off their home, the users' locality, and the report (Markdown and PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from server.bench_placement_stats import (Request, combined_placement, combined_shift, keep, locality, median, progress,
                                          summary)
from server.bench_placement_report import markdown, plot, recovery, targets


def test_summary_gives_mean_latencies_and_the_remote_share() -> None:
    a = Request("alice", 0, sent=0.0, arrivals=[1.0, 1.1, 1.3])
    b = Request("bob", 1, sent=0.5, arrivals=[0.7, 0.8])
    failed = Request("carol", 2, sent=0.0, error="3 of 8 tokens")
    counted = {"local": 30.0, "remote": 10.0, "disk_read_bytes": 9.4e6, "steps": 4.0, "tokens": 10.0,
               "round_trips": 6.0, "cpu_s": 3.5, "step_s": 0.4, "peer_wait_s": 0.1, "read_wait_s": 0.06}  # fmt: skip
    s = summary([a, b], counted)
    assert s["requests"] == 2 and s["failed"] == 0 and abs(s["mean_itl_s"] - 0.4 / 3) < 1e-12
    assert abs(s["mean_ttft_s"] - 0.6) < 1e-12 and s["remote_share"] == 0.25 and s["disk_read_bytes"] == 9.4e6
    assert s["tokens_per_step"] == 2.5 and s["round_trips_per_step"] == 1.5 and s["disk_bytes_per_step"] == 2.35e6
    assert s["step_s"] == 0.1 and s["peer_wait_s_per_step"] == 0.025 and s["read_wait_s_per_step"] == 0.015
    assert "a step: 2.5 tokens, 1.5 round trips, 100.0 ms of which 25.0 on peers, 15.0 on reads" in progress(s)
    none = summary([], dict.fromkeys(counted, 0.0))
    assert none["remote_share"] is None and none["tokens_per_step"] is None and none["mean_itl_s"] is None
    assert summary([a, failed], counted)["failed"] == 1


def test_rounds_combine_into_medians_with_every_round_kept() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0]) == 2.5 and median([]) is None

    def case(itl: float, failed: int, loaded: float | None) -> dict[str, object]:
        return {"requests": 9, "failed": failed, "errors": ["boom"] * failed, "mean_itl_s": itl, "mean_ttft_s": itl + 1,
                "remote_share": 0.3, "disk_read_bytes": 5e6, "placement_cost": 40.0, "migrated": True,
                "loaded_s": loaded, "locality": {"entropy_bits": {}}}  # fmt: skip

    c = combined_placement("prism", [case(0.09, 0, 2.0), case(0.07, 1, 3.0), case(0.2, 0, 1.0)])
    assert c["mean_itl_s"] == 0.09 and c["mean_ttft_s"] == 1.09 and c["requests"] == 27 and c["failed"] == 1
    assert c["round_itls_s"] == [0.09, 0.07, 0.2] and c["loaded_s"] == 3.0 and c["errors"] == ["boom"]
    assert "locality" not in c["rounds"][0] and c["placement"] == "prism"
    assert combined_placement("eplb", [case(0.1, 0, 2.0), case(0.1, 0, None)])["loaded_s"] is None  # one timed out

    run = _shift(True, 0.06, 0.065)
    other = _shift(True, 0.08, 0.075)
    shift = combined_shift(True, [{**run, "replan_migrated": True}, {**other, "replan_migrated": False}])
    phases = {p["phase"]: p for p in shift["phases"]}
    assert phases["before the shift"]["mean_itl_s"] == 0.07 and phases["before the shift"]["requests"] == 10
    assert phases["shifted, after a replan"]["round_itls_s"] == [0.065, 0.075] and shift["replan_migrated"] is False


def _shift(migration: bool, before: float, after: float, failed: int = 0) -> dict[str, object]:
    phases = [("before the shift", before), ("shifted, first period", 0.09), ("shifted, after a replan", after)]
    return {"migration": migration, "phases": [{"phase": p, "requests": 5, "failed": failed, "mean_itl_s": s}
                                               for p, s in phases]}  # fmt: skip


def test_recovery_is_the_share_of_the_gain_over_eplb_that_is_back_after_a_replan() -> None:
    assert recovery(_shift(True, 0.06, 0.065), 0.08) == (0.08 - 0.065) / (0.08 - 0.06)
    assert recovery(_shift(True, 0.09, 0.06), 0.08) is None  # no gain before the shift: nothing to recover
    assert recovery(_shift(True, 0.06, 0.06), None) is None


def test_targets_can_be_met_and_missed() -> None:
    def shape(name: str, prism: float, eplb: float, after_on: float, after_off: float, failed: int = 0
              ) -> dict[str, object]:
        cases = [{"placement": p, "requests": 4, "failed": 0, "mean_itl_s": s} for p, s in (("prism", prism),
                                                                                          ("eplb", eplb))]
        return {"shape": name, "placements": cases,
                "shift": [_shift(True, prism, after_on, failed), _shift(False, prism, after_off)]}  # fmt: skip

    met = targets(shape("many", 0.06, 0.1, 0.065, 0.095))
    assert [ok for _, _, ok in met] == [True, True, True, True]
    assert met[0][1] == "40.0% below" and met[3][1] == "0 of 38"
    missed = targets(shape("many", 0.08, 0.1, 0.097, 0.081, failed=1))
    assert [ok for _, _, ok in missed] == [False, False, False, False]
    assert targets(shape("bench", 0.099, 0.1, 0.099, 0.1))[0][2] is True  # bench: below eplb at all


def test_locality_gives_each_users_entropy_and_the_overlap_of_their_top_experts() -> None:
    def home(counts: list[list[int]], entropy: float) -> dict[str, object]:
        return {"layers": [{"counts": c, "entropy_bits": entropy} for c in counts]}

    stats = {"homes": {"agent0": home([[9, 1, 0, 0]], 0.5), "agent1": home([[0, 1, 9, 0]], 0.5),
                       "agent2": home([[0, 0, 1, 9]], 1.0)}}  # fmt: skip
    loc = locality(stats, {"alice": "agent0", "bob": "agent1", "carol": "agent2"}, top=2)
    assert loc["entropy_bits"] == {"alice": 0.5, "bob": 0.5, "carol": 1.0}
    assert loc["top_overlap"] == {"alice-bob": 1 / 3, "alice-carol": 0.0, "bob-carol": 1 / 3}


def test_the_report_names_its_settings_and_the_plot_is_written(tmp_path: Path) -> None:
    case = {"placement": "prism", "requests": 3, "mean_itl_s": 0.02, "mean_ttft_s": 0.3, "remote_share": 0.4,
            "placement_cost": 12.0, "migrated": True, "loaded_s": 2.5, "disk_read_bytes": 47e6,
            "tokens_per_step": 2.25, "round_trips_per_step": 7.5, "disk_bytes_per_step": 1.5e6, "agent_cpu_s": 61.2,
            "step_s": 0.05, "peer_wait_s_per_step": 0.02, "read_wait_s_per_step": None,
            "locality": {"entropy_bits": {"alice": 1.5}, "top_overlap": {"alice-bob": 0.2}}}
    phases = [{"phase": p, "requests": 3, "failed": 0, "mean_itl_s": 0.02, "remote_share": 0.4}
              for p in ("before the shift", "shifted")]
    data = {"command": "potluck bench placement", "rate": 0.5, "phase_seconds": 60.0, "prompt_tokens": 128,
            "gen_tokens": 64, "shapes": [{"shape": "bench", "placements": [case],
                                          "shift": [{"migration": True, "replan_migrated": True, "phases": phases}],
                                          "settings": {"experts": 16, "top_k": 2, "moe_layers": 8,
                                                       "memory": [1e8, 1e8, 2e8], "pooled_fraction": 0.6,
                                                       "expert_bytes_total": 6.7e8, "disk": "50MB/s",
                                                       "uniform_entropy": 4.0, "link": "500Mbit/s",
                                                       "latency": "1ms"}}]}  # fmt: skip
    text = markdown(data)
    assert "| prism | 20.0 | 20.0 | 300.0 | 40.0% | 47 MB | 12.0 | 2.5 s |" in text and "500Mbit/s" in text
    assert "alice 1.50" in text and "1 round(s)" in text and "| prism | 2.2 | 7.5 | 1.50 MB | 50.0 | 20.0 | n/a | 61 s |" in text
    assert "migration on" in text and "| before the shift | 20.0 | 20.0 | 40.0% | n/a |" in text
    plot(data, tmp_path / "placement.png")
    assert (tmp_path / "placement.png").stat().st_size > 10_000


def test_each_case_is_kept_as_it_ends(tmp_path: Path) -> None:
    keep(tmp_path, {"shape": "many", "round": 1, "placement": "prism", "mean_itl_s": 0.1})
    keep(tmp_path, {"shape": "many", "round": 1, "placement": "eplb", "mean_itl_s": None})
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert [json.loads(x)["placement"] for x in lines] == ["prism", "eplb"]
    assert json.loads(lines[1])["mean_itl_s"] is None
