"""`potluck bench decode` end to end, shrunk: the tiny model, one agent, one round, 4 tokens after 8.

A real `potluck up` cluster (a child of the bench), real streamed requests, transformers on the
same checkpoint; the figures are not judged (a 2-core CI host), only that every part ran and the
report says what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SMOKE_TIMEOUT_S = 120  # it takes about 15 s on a 2-core host: the agent loads, 2 + 2 requests


def test_a_tiny_decode_bench_runs_and_reports(qwen_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    flags = ["--model", str(qwen_tiny), "--cases", "compute", "--decode-agents", "1", "--rounds", "1",
             "--prompt-tokens", "8", "--gen-tokens", "4", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "server.cli", "bench", "decode", *flags], env=env,
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "decode.json").read_text())
    assert [(c["case"], c["agents"]) for c in data["cases"]] == [("transformers", 1), ("compute", 1)]
    for case in data["cases"]:
        assert case["min_tokens"] == 4 and case["median_itl_s"] > 0, case  # ignore_eos: no stream ends early
        assert len(case["rounds"]) == 1
    md = (out / "decode.md").read_text()
    assert md.startswith("`potluck bench decode " + " ".join(flags) + "`") and "nan" not in md.lower()
    assert "| 1 agent <= 1.0x transformers |" in md and (out / "decode.png").stat().st_size > 0
    assert "1 agent <= 1.0x transformers" in done.stdout  # the printed table with its targets
