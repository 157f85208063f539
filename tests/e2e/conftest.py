"""`potluck up` as a real subprocess: real agents (child processes, gRPC on loopback), the real
server, a real tiny checkpoint. Tests talk to it over HTTP only, through the OpenAI SDK or httpx.

Each server is torn down with SIGTERM, and the teardown asserts that it exited with status 0
and left none of its agent processes behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from server.certs import enrol
from server.launcher import free_port

API_KEY = "e2e-secret-key"
START_TIMEOUT_S = 180.0  # agents load their dense weights, then the server starts
STOP_TIMEOUT_S = 60.0


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def potluck_command() -> list[str]:
    script = Path(sys.executable).parent / "potluck"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


@dataclass
class PotluckUp:
    """One running `potluck up`."""

    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    log_path: Path
    agents: list[int]  # PIDs of its agent processes

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, api_key: str = "unused") -> OpenAI:
        # No retries: a 429 or 503 must reach the test as it is.
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        """SIGTERM, wait; the exit status. Asserts that no agent process is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"potluck up did not stop within {STOP_TIMEOUT_S}s:\n{self.log_tail()}")
        left = [pid for pid in self.agents if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"potluck up left agent processes {left} running:\n{self.log_tail()}"
        return code


AGENT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def certs(work: Path, *nodes: str) -> Path:
    """The `potluck certs` folder of `work` (one CA per folder) with certificates for `nodes` and
    the server: `--certs` takes it whole, for `serve` as for any of its agents."""
    enrol(work / "certs", nodes, days=1)
    return work / "certs"


class Agent:
    """One `potluck agent` process (as on a device of its own, enrolled in `work`'s CA), serving
    once its log says so."""

    def __init__(self, work: Path, model: Path, name: str, port: int, *extra: str, host: str = "127.0.0.1",
                 wrap: tuple[str, ...] = ()) -> None:
        """`wrap` goes before the command (e.g. `ip netns exec NS` to run it in a namespace)."""
        self.name, self.address = name, f"{host}:{port}"
        self.log = work / f"agent-{name}-{port}.log"
        self.certs = certs(work, name)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*wrap, *potluck_command(), "agent", "--name", name, "--listen", self.address,
                                          "--model", str(model), "--certs", str(self.certs), *extra],
                                         stdout=log, stderr=subprocess.STDOUT, env=AGENT_ENV)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving on" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_up(model: Path, workdir: Path, *extra: str) -> PotluckUp:
    port = free_port()
    log_path = workdir / f"potluck-up-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(workdir / "cache"), "POTLUCK_API_KEY": ""}
    agents = [] if "--inventory" in extra else ["--agents", "2"]  # an inventory names its own (two, here)
    command = [*potluck_command(), "up", "--model", str(model), *agents, "--port", str(port), *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = PotluckUp(proc, f"http://127.0.0.1:{port}", log_path, [])
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"potluck up exited with {proc.returncode} while starting:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"potluck up was not healthy within {START_TIMEOUT_S}s:\n{server.log_tail()}")
        time.sleep(0.3)
    server.agents = children_of(proc.pid)
    assert len(server.agents) == 2, f"expected 2 agent processes, found {server.agents}"
    return server


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("e2e")
    yield path
    shutil.rmtree(path / "cache", ignore_errors=True)


@pytest.fixture(scope="session")
def potluck(qwen_tiny: Path, e2e_dir: Path) -> Iterator[PotluckUp]:
    """The default open server: `potluck up --model <tiny> --agents 2`."""
    server = start_up(qwen_tiny, e2e_dir)
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="session")
def guarded(qwen_tiny: Path, e2e_dir: Path) -> Iterator[PotluckUp]:
    """A second server with an API key and no waiting room (a request beyond the running one: 429)."""
    server = start_up(qwen_tiny, e2e_dir, "--api-key", API_KEY, "--max-waiting", "0", "--max-running", "1",
                      "--served-model-name", "tiny-guarded")  # fmt: skip
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="session")
def base_url(potluck: PotluckUp) -> str:
    return potluck.url


@pytest.fixture(scope="session")
def client(potluck: PotluckUp) -> OpenAI:
    return potluck.client()


@pytest.fixture(scope="session")
def model_id(client: OpenAI) -> str:
    return client.models.list().data[0].id
