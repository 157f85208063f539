"""The prefill benchmark's target check, on data shaped like its JSON."""

from __future__ import annotations

from typing import Any

from server.bench_report import targets


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
