"""Local agent processes for `potluck up`: start, wait until serving, watch, stop.

    agents = LocalAgents(model_dir, plan_local_agents(2, profile), log_level="INFO")
    agents.start()                  # one child process per agent: `python -m server.cli agent ...`
    agents.wait_ready(timeout_s=120)    # gRPC health check reports SERVING for every agent
    ...                             # agents.revive() restarts a child that exited, with backoff
    agents.stop()                   # SIGTERM, wait, SIGKILL after a grace period; never leaves one

Unless `insecure`, the agents and the server speak mutual TLS with a throwaway CA made at start
in a private temporary folder (removed at stop): `server_credentials` is the server's identity.

Children run in their own session, so a Ctrl-C in the terminal reaches only `potluck up`, which
then stops them in order (rather than every process racing to exit at once). On Linux they also
get SIGKILL if `potluck up` itself dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.security import Credentials, agent_identity, open_blocking_channel
from scheduler.types import NodeId, NodeSpec
from server.certs import SERVER_FOLDER, folders, throwaway
from server.inventory import Inventory, InventoryError, NodeProfile, is_loopback, split_address

log = logging.getLogger("potluck.up")

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # before the 1st, 2nd, ... restart of one agent
STEADY_S = 60.0  # an agent up this long has its backoff reset

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class AgentExited(RuntimeError):
    """A local agent process exited while `potluck up` needed it."""


@dataclass(frozen=True)
class AgentLaunch:
    """One local agent to start."""

    name: str  # NodeId
    listen: str  # 127.0.0.1:port
    profile: NodeProfile
    torch_threads: int  # torch intra-op threads; agents on one machine split its cores
    data_port: int = 0  # its decode data plane's port, chosen with the others (0: an ephemeral one)


def available_cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_agent(agents: int, cores: int) -> int:
    """Fair share of the cores, so that agents never oversubscribe the machine together."""
    return max(1, cores // max(1, agents))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the agent binds it right after)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct TCP ports that were free a moment ago, none of them in `avoid`.

    The kernel may hand the same port to consecutive bind(0) calls once the first socket is
    closed, so every socket stays open until all are chosen. `avoid` names ports that are
    promised elsewhere but not bound yet, such as the API port of the same `potluck up`."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        return ports


def plan_local_agents(count: int, profile: NodeProfile, cores: int | None = None,
                      avoid: Collection[int] = ()) -> list[AgentLaunch]:
    """`count` agents named agent0.. on distinct free loopback ports (none in `avoid`), all with `profile`."""
    threads = _threads(profile, threads_per_agent(count, cores or available_cores()))
    # The data planes' ports too: an agent picking an ephemeral one could take the port another
    # agent of this launch was given and has not bound yet.
    ports = free_ports(2 * count, avoid=avoid)
    return [AgentLaunch(f"agent{i}", f"127.0.0.1:{port}", profile, threads, data_port)
            for i, (port, data_port) in enumerate(zip(ports[:count], ports[count:]))]


def launches_from_inventory(inventory: Inventory, cores: int | None = None,
                            avoid: Collection[int] = ()) -> list[AgentLaunch]:
    """The inventory's agents, to start on this machine; InventoryError if one is not loopback
    or listens on a port in `avoid` (the API's own port)."""
    remote = [f"{n.name} ({n.address})" for n in inventory.nodes if not is_loopback(n.address)]
    if remote:
        raise InventoryError(
            f"potluck up starts agents on this machine only, but these nodes are not on loopback: "
            f"{', '.join(remote)}; start those with `potluck agent` on their devices and use `potluck serve`"
        )
    taken = [f"{n.name} ({n.address})" for n in inventory.nodes if split_address(n.address)[1] in avoid]
    if taken:
        raise InventoryError(f"these nodes would listen on the API's port: {', '.join(taken)}; give them another port")
    threads = threads_per_agent(len(inventory.nodes), cores or available_cores())
    listening = {split_address(n.address)[1] for n in inventory.nodes}
    data_ports = free_ports(len(inventory.nodes), avoid={*avoid, *listening})
    return [AgentLaunch(n.name, n.address, n.profile, _threads(n.profile, n.torch_threads or threads), data_port)
            for n, data_port in zip(inventory.nodes, data_ports)]


def _threads(profile: NodeProfile, fair: int) -> int:
    """An agent with emulated (paced) compute runs torch on its one compute thread."""
    return 1 if profile.compute_share else fair


def specs_of(launches: Sequence[AgentLaunch]) -> tuple[NodeSpec, ...]:
    return tuple(NodeSpec(NodeId(launch.name), launch.listen) for launch in launches)


class LocalAgents:
    """The agent child processes of one `potluck up`."""

    def __init__(self, model_dir: Path, launches: Sequence[AgentLaunch], log_level: str = "INFO",
                 insecure: bool = False, enrolment: Path | None = None) -> None:
        self.model_dir = model_dir
        self.launches = tuple(launches)
        self.log_level = log_level
        self.insecure = insecure
        self.enrolment = enrolment  # a `potluck certs` folder to use; None: a throwaway CA
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started: dict[str, float] = {}  # when each agent's process last started
        self._restarts: dict[str, int] = {}  # restarts in a row (reset once it stays up STEADY_S)
        self._due: dict[str, float] = {}  # when an exited agent is to be started again
        self._certs: dict[str, Path] = {}  # certificate folder of each agent and of the server
        self._certs_root: Path | None = None
        self.server_credentials: Credentials | None = None  # set by start() unless insecure

    def command(self, launch: AgentLaunch) -> list[str]:
        p = launch.profile
        return [
            sys.executable, "-m", "server.cli", "agent",
            "--listen", launch.listen, "--model", str(self.model_dir), "--name", launch.name,
            "--expert-memory", str(p.expert_memory_bytes),
            "--disk-bandwidth", f"{p.disk_bytes_per_s:f}", "--link-bandwidth", f"{p.link_bytes_per_s:f}",
            "--link-latency", f"{p.link_latency_s:.9f}s", "--compute-share", f"{p.compute_share:f}",
            "--torch-threads", str(launch.torch_threads), "--data-port", str(launch.data_port),
            "--log-level", self.log_level,
            *(["--insecure"] if self.insecure else ["--certs", str(self._enrol()[launch.name])]),
        ]  # fmt: skip

    def _enrol(self) -> dict[str, Path]:
        """The certificate folders, made on first use (stop() removes them)."""
        if not self.insecure and not self._certs:
            names = [launch.name for launch in self.launches]
            if self.enrolment is not None:
                self._certs = folders(self.enrolment, names)
                for folder in self._certs.values():
                    Credentials.load(folder)  # CredentialsError now, naming what is missing, not in a child
            else:
                self._certs_root = Path(tempfile.mkdtemp(prefix="potluck-certs-"))  # mode 0700
                self._certs = throwaway(self._certs_root, names)
            self.server_credentials = Credentials.load(self._certs[SERVER_FOLDER])
        return self._certs

    def start(self) -> None:
        self._enrol()
        for launch in self.launches:
            log.info("starting agent %s on %s (%d torch threads)", launch.name, launch.listen, launch.torch_threads)
            self._spawn(launch)

    def _spawn(self, launch: AgentLaunch) -> None:
        self._procs[launch.name] = subprocess.Popen(
            self.command(launch), start_new_session=True, preexec_fn=die_with_parent
        )
        self._started[launch.name] = time.monotonic()

    def revive(self, now: float | None = None) -> list[str]:
        """Start again every agent whose process exited, after a backoff that grows with each
        restart in a row (RESTART_BACKOFF_S); the server serves on the others meanwhile and takes
        the agent back when it answers. Returns what it did, for the log."""
        now = time.monotonic() if now is None else now
        done = []
        for launch in self.launches:
            name, proc = launch.name, self._procs.get(launch.name)
            if proc is None or proc.poll() is None:
                if proc is not None and now - self._started.get(name, now) > STEADY_S:
                    self._restarts.pop(name, None)
                continue
            if name not in self._due:
                n = self._restarts.get(name, 0)
                delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
                self._due[name] = now + delay
                done.append(f"agent {name} exited with code {proc.returncode}; restarting it in {delay:.0f} s "
                            f"(serving on the others meanwhile)")
            elif now >= self._due[name]:
                del self._due[name]
                self._restarts[name] = self._restarts.get(name, 0) + 1
                self._spawn(launch)
                done.append(f"agent {name} restarted (restart {self._restarts[name]} in a row)")
        return done

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every agent's gRPC health check reports SERVING; AgentExited if one exits."""
        deadline = time.monotonic() + timeout_s
        pending = {launch.name: launch.listen for launch in self.launches}
        while pending:
            self.raise_if_dead()
            for name, address in list(pending.items()):
                if _serving(address, name, self.server_credentials):
                    log.info("agent %s is serving on %s", name, address)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise AgentExited(f"agents {sorted(pending)} did not report SERVING within {timeout_s:.0f}s")
            time.sleep(0.2)

    def dead(self) -> str | None:
        """'<name> (exit code N)' of an agent that has exited, or None while all run."""
        for name, proc in self._procs.items():
            code = proc.poll()
            if code is not None:
                return f"{name} (exit code {code})"
        return None

    def raise_if_dead(self) -> None:
        dead = self.dead()
        if dead is not None:
            raise AgentExited(f"agent {dead} exited")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child, wait up to `grace_s` in all, then SIGKILL the stragglers."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("agent %s did not stop within %.0fs; killing it", name, grace_s)
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._certs_root is not None:
            shutil.rmtree(self._certs_root, ignore_errors=True)
            self._certs_root = None


def _serving(address: str, name: str, creds: Credentials | None) -> bool:
    """True when agent `name` at `address` answers the standard gRPC health check with SERVING."""
    with open_blocking_channel(address, agent_identity(name), creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False  # not listening yet, or still loading its weights
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def die_with_parent() -> None:
    """`preexec_fn` for a child process that must not outlive the one that starts it: on Linux it
    gets SIGKILL when its parent dies, however that dies (elsewhere it is left alone). Runs in the
    child between fork and exec."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within grace_s (a benchmark's cluster)."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
