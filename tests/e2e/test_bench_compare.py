"""`potluck bench` (compare) end to end, shrunk: the tiny model, a 24-token prompt, one repeat.
The figures are not judged (a 2-core CI host); the equal work is: potluck's logits of every
position must be transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SMOKE_TIMEOUT_S = 120


def test_a_tiny_compare_bench_does_transformers_work_and_reports(qwen_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--model", str(qwen_tiny), "--tokens", "24",
                           "--repeats", "1", "--threads", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "prefill_vs_transformers.json").read_text())
    assert data["max_abs_logit_difference"] <= 1e-4
    assert len(data["potluck_1_agent_s"]) == len(data["transformers_s"]) == len(data["potluck_last_logits_s"]) == 1
    assert data["ratio_potluck_over_transformers"] > 0
    assert "on the same work" in done.stdout
