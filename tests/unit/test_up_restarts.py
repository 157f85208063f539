"""`potluck up` starts a child agent that exited again, after a backoff that grows with each
restart in a row; real child processes (one that exits at once stands in for a crashing agent)."""

from __future__ import annotations

import sys
from pathlib import Path

from server.inventory import NodeProfile
from server.launcher import RESTART_BACKOFF_S, AgentLaunch, LocalAgents


class Crashing(LocalAgents):
    """Agents whose process exits at once with status 3 (the command is the only change)."""

    def command(self, launch: AgentLaunch) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


def test_a_dead_agent_is_restarted_with_growing_backoff(tmp_path: Path) -> None:
    launch = AgentLaunch("a0", "127.0.0.1:1", NodeProfile(0, 0, 0, 0), 1)
    agents = Crashing(tmp_path, [launch], insecure=True)
    agents.start()
    try:
        first = agents._procs["a0"]
        first.wait(30)
        now = 1000.0
        assert agents.revive(now) == [f"agent a0 exited with code 3; restarting it in {RESTART_BACKOFF_S[0]:.0f} s "
                                      f"(serving on the others meanwhile)"]
        assert agents.revive(now + RESTART_BACKOFF_S[0] / 2) == []  # not yet
        assert agents.revive(now + RESTART_BACKOFF_S[0]) == ["agent a0 restarted (restart 1 in a row)"]
        second = agents._procs["a0"]
        assert second is not first
        second.wait(30)
        now += 10
        assert agents.revive(now) == [f"agent a0 exited with code 3; restarting it in {RESTART_BACKOFF_S[1]:.0f} s "
                                      f"(serving on the others meanwhile)"]
        assert agents.revive(now + RESTART_BACKOFF_S[1]) == ["agent a0 restarted (restart 2 in a row)"]
    finally:
        agents.stop()
