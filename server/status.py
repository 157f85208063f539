"""The cluster at a glance, for admins: `GET /admin/status` (JSON) and `potluck status` (a table).

    cluster_status(snapshot, model, version)  -> {"model": ..., "agents": [...], "running": 2, ...}
    fetch_status(url, api_key)                -> that JSON, as `potluck status` reads it from a server
    status_table(status)                      -> the text `potluck status` prints

The first and the last are pure: the route hands in the engine's snapshot (what the membership
poller last heard from each agent, refreshed every couple of seconds), the command hands in the
route's JSON.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from protos.human import format_size
from scheduler.types import EngineSnapshot
from server.setup_checks import SetupError


def cluster_status(snapshot: EngineSnapshot | None, model: str, version: str) -> dict[str, Any]:
    agents = []
    for a in snapshot.agents if snapshot else ():
        asked = a.hits + a.misses
        agents.append({
            "name": a.name, "address": a.address, "labels": list(a.labels), "up": a.up,
            "problem": "" if a.up else a.problem,
            "expert_memory_used_bytes": a.bytes_used, "expert_memory_budget_bytes": a.capacity_bytes,
            "experts_held": len(a.held), "experts_pinned": len(a.placed), "hit_rate": a.hits / asked if asked else None,
            "disk_read_bytes": a.bytes_read, "link_sent_bytes": a.bytes_sent, "requests": a.requests,
        })  # fmt: skip
    return {"model": model, "version": version, "running": snapshot.running if snapshot else 0,
            "waiting": snapshot.waiting if snapshot else 0, "agents": agents}  # fmt: skip


COLUMNS = ("agent", "address", "state", "expert memory", "experts", "hit rate", "read", "sent", "requests")


def fetch_status(server_url: str, api_key: str | None) -> dict[str, Any]:
    """GET /admin/status of the server at `server_url`; a refusal or an unreachable server is a
    SetupError that says what to do."""
    url = f"{server_url.rstrip('/')}/admin/status"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body: dict[str, Any] = json.loads(reply.read())
            return body
    except urllib.error.HTTPError as exc:
        hint = "; give --api-key" if exc.code == 401 else ""
        raise SetupError(f"{url} answered {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SetupError(f"cannot reach the server at {server_url} ({reason}); is `potluck serve` running "
                         f"there? (--url)") from None


def status_table(status: dict[str, Any]) -> str:
    """A fixed-width table, one agent a row, under a line with the model and the queue."""
    rows = [COLUMNS]
    for a in status["agents"]:
        budget = a["expert_memory_budget_bytes"]
        memory = f"{format_size(a['expert_memory_used_bytes'])} / {format_size(budget)}" if budget else \
            f"{format_size(a['expert_memory_used_bytes'])} (no budget)"
        rate = a["hit_rate"]
        held = f"{a['experts_held']} ({a['experts_pinned']} pinned)" if a.get("experts_pinned") else str(a["experts_held"])
        rows.append((a["name"], a["address"], "up" if a["up"] else "DOWN", memory, held,
                     "-" if rate is None else f"{rate:.1%}", _bytes(a["disk_read_bytes"]),
                     _bytes(a["link_sent_bytes"]), str(a["requests"])))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"model {status['model']} (potluck {status['version']}): {status['running']} running, "
             f"{status['waiting']} waiting; {sum(a['up'] for a in status['agents'])} of {len(status['agents'])} "
             f"agents up"]  # fmt: skip
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{a['name']} is down: {a['problem']}" for a in status["agents"] if not a["up"] and a["problem"]]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    return "0" if n == 0 else format_size(n)
