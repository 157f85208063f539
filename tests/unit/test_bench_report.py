"""The prefill benchmark's target check, on data shaped like its JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.bench_prefill import over_rounds
from server.bench_report import targets, write_report


def case(policy: str, agents: int, cold: float, warm: float, c1: float, bound_cold: float) -> dict[str, Any]:
    bound_warm = c1 / agents
    return {"policy": policy, "agents": agents, "tokens": 2048, "compute_s": c1, "cold_ttft_s": cold,
            "warm_ttft_s": warm, "cold_efficiency": bound_cold / cold, "warm_efficiency": bound_warm / warm,
            "attention_max_over_mean": 1.02, "prefetch_recall": 0.99}


def test_ablations_are_judged_by_efficiency_so_host_drift_between_cases_does_not_count() -> None:
    sirius = case("sirius", 4, 7.2, 1.58, 4.62, 6.6)
    # Run later on a host 10% faster: its raw warm TTFT is lower, yet against its own one-agent
    # compute it is 5.5% slower than sirius.
    no_prefetch = case("sirius--no-prefetch", 4, 8.0, 1.50, 4.16, 6.6)
    no_interleave = case("sirius--no-interleave", 4, 7.0, 1.42, 4.20, 6.6)  # as fast, all told
    data = {"cases": [case("sirius", 1, 27.0, 27.6, 4.94, 6.6), sirius, no_prefetch, no_interleave]}
    rows = {t: (m, ok) for t, m, ok in targets(data)}
    measured, met = rows["--no-prefetch is >= 5% slower (cold or warm), by efficiency"]
    assert met and measured.startswith("1.11x / 1.05x")
    measured, met = rows["--no-interleave is >= 5% slower (cold or warm), by efficiency"]
    assert not met and "TTFT 0.97x / 0.90x" in measured


def test_a_case_run_in_rounds_reports_the_median_of_each_rounds_own_efficiency(tmp_path: Path) -> None:
    # The host drifts between rounds: each round's warm TTFT is judged against its own one-agent
    # compute, so the fast second round's 0.70 and the slow third's 0.90 are both counted as such.
    rounds = [{**case("sirius", 4, 7.0 + i, warm, c1, 6.6), "cold_read_mb": 120.0, "compute_overrun": overrun,
               "warm": [{"ttft_s": warm}]}
              for i, (warm, c1, overrun) in enumerate([(1.25, 4.0, 0.002), (1.50, 4.2, 0.011), (1.20, 4.32, 0.004)])]
    merged = over_rounds(rounds)
    assert merged["compute_overrun"] == 0.011  # the emulation check: the worst round's, not a median
    assert merged["warm_efficiency"] == pytest.approx(0.8)  # 0.80, 0.70, 0.90
    assert merged["warm_ttft_s"] == pytest.approx(1.25) and merged["compute_s"] == pytest.approx(4.2)
    assert merged["warm"] == [{"ttft_s": 1.25}]  # the requests of the middle round
    assert [r["warm_efficiency"] for r in merged["rounds"]] == pytest.approx([0.8, 0.7, 0.9])
    assert over_rounds(rounds[:1]) is rounds[0]  # one round: as it was, no per-round list

    one = {**case("sirius", 1, 27.0, 27.6, 4.94, 6.6), "cold_read_mb": 610.0}
    data = {"cases": [one, merged], "expert_bytes_total": 6e8, "expert_memory_per_agent": 1.5e8,
            "disk_bytes_per_s": 2e7, "link": "1Gbit/s", "cores": 2, "compute_share": 0.25,
            "read_all_experts_s": 30.0, "compute_s": {2048: 4.94}, "io_ratio": 6.1}
    write_report(data, tmp_path)  # the plot too: a real matplotlib figure
    md = (tmp_path / "prefill.md").read_text()
    assert "- sirius, 4 agents, 2048 tokens: " in md and "/ 0.80, " in md and "/ 0.70, " in md and md.count("/ 0.90") == 1
    assert "| efficiency >= 0.8 (cold / warm) |" in md and (tmp_path / "prefill.png").stat().st_size > 0
