"""deploy/systemd/install.sh run for real, as root, into a temporary prefix: it creates the system
user, the folders, the venv (pinned torch, then potluck), the config files and the demo model,
and installs units that systemd-analyze accepts, and the cluster's certificates; the agent and the
server then answer a request when started as the unit's ExecStart says, as that user, from the
installed files, over mutual TLS. A second run keeps the admin's edits and the certificates.

What stays unchecked here: systemd itself starting the units (this machine's PID 1 is not
systemd), so neither the sandboxing options nor CacheDirectory= are exercised; the test makes
the cache folder that CacheDirectory= would. A full install takes about two minutes (the venv).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.security import SERVER_IDENTITY, Credentials, agent_identity, open_blocking_channel
from server.certs import own_folder
from server.launcher import free_ports
from tests.unit.test_deploy import SYSTEMD, exec_start, makefile_torch, read_env_file, tool, unit_environment

NAME = "box1"  # the node name given to install.sh
INSTALL_TIMEOUT_S = 1200.0
START_TIMEOUT_S = 180.0
UNITS = ("potluck-agent@.service", "potluck-server.service")

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    root: Path  # everything below it is removed afterwards
    prefix: Path
    conf: Path
    data: Path
    units: Path
    user: str
    python: str  # the interpreter the venv was made from
    output: str  # what the first run printed

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHON": self.python, "POTLUCK_USER": self.user, "POTLUCK_PREFIX": str(self.prefix),
                "POTLUCK_CONF": str(self.conf), "POTLUCK_DATA": str(self.data), "POTLUCK_UNIT_DIR": str(self.units)}

    def run(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SYSTEMD / "install.sh"), NAME], env=self.env(), capture_output=True,
                              text=True, timeout=INSTALL_TIMEOUT_S)  # fmt: skip


def usable_python() -> str | None:
    """A Python 3.11+ with venv that an unprivileged user can run (a venv links to it, and the
    services run as the potluck user; pyenv's, under root's 0700 home, is not one)."""
    candidates = ["/usr/bin/python3", shutil.which("python3"), "/usr/local/bin/python3"]
    for candidate in dict.fromkeys(filter(None, candidates)):
        check = [candidate, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"]
        try:
            as_nobody = subprocess.run(check, user=65534, group=65534, extra_groups=[], capture_output=True, timeout=60)
            if as_nobody.returncode == 0:
                return candidate
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.skip(f"install.sh creates a system user and chowns folders: it needs root, this is uid {os.geteuid()}")
    missing = [c for c in ("useradd", "groupadd", "userdel", "runuser", "getent") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"install.sh needs {', '.join(missing)}, which this machine lacks")
    python = usable_python()
    if python is None:
        pytest.skip("no Python 3.11+ with venv here that a non-root user may run (the services run as one)")
    user = f"potluck-ci{os.getpid()}"
    # Not pytest's tmp_path: its parent is 0700, and the potluck user must reach the venv.
    root = Path(tempfile.mkdtemp(prefix="potluck-install-"))
    root.chmod(0o755)
    setup = Installed(root, root / "opt", root / "etc", root / "srv", root / "units", user, python, "")
    setup.units.mkdir()
    try:
        done = setup.run()
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"install.sh failed ({done.returncode}):\n{output}"
        yield replace(setup, output=done.stdout)
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)  # gone with the user where USERGROUPS_ENAB
        shutil.rmtree(root, ignore_errors=True)


def test_creates_the_system_user_folders_config_and_demo_model(installed: Installed) -> None:
    account = pwd.getpwnam(installed.user)
    assert account.pw_uid < 1000 and account.pw_shell == "/usr/sbin/nologin"  # a system account, no login
    assert account.pw_dir == str(installed.data)
    models = installed.data / "models"
    assert models.stat().st_uid == account.pw_uid and (models / "demo" / "config.json").is_file()
    for folder in (installed.prefix, installed.conf, installed.data):
        assert folder.stat().st_uid == 0 and stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    assert stat.S_IMODE((installed.conf / "server.env").stat().st_mode) == 0o600  # it holds the API key
    agent_env = read_env_file(installed.conf / f"agent-{NAME}.env")
    assert agent_env["POTLUCK_MODEL"] == str(models / "demo")  # the example, with this install's paths
    assert (installed.conf / "agent.env.example").is_file() and (installed.conf / "inventory.yaml").is_file()


def _readable_by(path: Path, uid: int, gid: int) -> bool:
    done = subprocess.run(["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True, timeout=30)
    return done.returncode == 0


def test_makes_the_certificates_with_keys_only_the_services_user_reads(installed: Installed) -> None:
    certs = installed.conf / "certs"
    assert f"wrote the certificates to {certs}" in installed.output
    account = pwd.getpwnam(installed.user)
    ca_key = (certs / "ca.key").stat()
    assert (ca_key.st_uid, ca_key.st_gid, stat.S_IMODE(ca_key.st_mode)) == (0, 0, 0o600)  # enrols; root's alone
    assert not _readable_by(certs / "ca.key", account.pw_uid, account.pw_gid)
    for node, identity in ((NAME, agent_identity(NAME)), (None, SERVER_IDENTITY)):
        folder = own_folder(certs, node)  # what --certs of the unit finds
        assert Credentials.load(folder).identity == identity
        key = (folder / "key.pem").stat()
        assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (0, account.pw_gid, 0o640), folder
        assert _readable_by(folder / "key.pem", account.pw_uid, account.pw_gid)
        assert not _readable_by(folder / "key.pem", 65534, 65534)  # nobody else


def test_venv_holds_the_pinned_torch_and_a_copy_of_potluck(installed: Installed) -> None:
    python = installed.prefix / ".venv" / "bin" / "python"
    probe = "import torch, server; print(torch.__version__); print(server.__file__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                          cwd="/", env={"PATH": "/usr/bin:/bin"})  # not this checkout's packages
    version, location = done.stdout.split()
    assert version.split("+")[0] == makefile_torch()
    assert location.startswith(str(installed.prefix)), "potluck runs from the checkout, not the venv"


def test_installed_units_pass_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    units = [tmp_path / f"potluck-agent@{NAME}.service", tmp_path / "potluck-server.service"]
    shutil.copy(installed.units / "potluck-agent@.service", units[0])
    shutil.copy(installed.units / "potluck-server.service", units[1])
    for unit in units:
        text = unit.read_text()
        assert f"User={installed.user}" in text and str(installed.prefix) in text and "/opt/potluck" not in text
    done = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    # ExecStart's binary is checked for real here: it is the venv's potluck.
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def _set(path: Path, **values: str) -> None:
    """An admin's edit of an env file: each KEY=... line replaced."""
    lines = path.read_text().splitlines()
    for key, value in values.items():
        lines = [f"{key}={value}" if line.startswith(f"{key}=") else line for line in lines]
    path.write_text("\n".join(lines) + "\n")


def _start(installed: Installed, unit: str, instance: str, cache: Path) -> subprocess.Popen[bytes]:
    """The unit's ExecStart as its user, with the environment systemd would give it."""
    path = installed.units / unit
    files = {f"{installed.conf}/agent-%i.env".replace("%i", instance): installed.conf / f"agent-{instance}.env",
             f"{installed.conf}/server.env": installed.conf / "server.env"}  # fmt: skip
    env = unit_environment(path, instance, files)
    env = {k: v.replace("/var/cache/potluck", str(cache)) for k, v in env.items()}  # as CacheDirectory= would
    account = pwd.getpwnam(installed.user)
    env |= {"PATH": "/usr/bin:/bin", "HOME": account.pw_dir, "USER": installed.user}
    command = exec_start(path, instance, env)
    # TLS with install.sh's certificates, never plaintext.
    assert command[command.index("--certs") + 1] == str(installed.conf / "certs") and "--insecure" not in command
    log = (installed.root / f"{unit}.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, user=account.pw_uid,
                            group=account.pw_gid, extra_groups=[], cwd="/")  # fmt: skip


def _health(address: str, creds: Credentials | None) -> int:
    """The agent's gRPC health status as a client with `creds` sees it (None: plaintext); -1: refused."""
    with open_blocking_channel(address, agent_identity(NAME), creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return -1
        return int(reply.status)


def test_agent_and_server_answer_from_the_installed_files(installed: Installed) -> None:
    grpc_port, data, http = free_ports(3)
    _set(installed.conf / f"agent-{NAME}.env", POTLUCK_LISTEN=f"127.0.0.1:{grpc_port}", POTLUCK_DATA_PORT=str(data))
    _set(installed.conf / "server.env", POTLUCK_HOST="127.0.0.1", POTLUCK_PORT=str(http))
    inventory = installed.conf / "inventory.yaml"
    inventory.write_text(inventory.read_text().replace("127.0.0.1:50051", f"127.0.0.1:{grpc_port}"))
    cache = installed.root / "cache"
    cache.mkdir(exist_ok=True)
    shutil.chown(cache, installed.user, installed.user)
    agent = _start(installed, UNITS[0], NAME, cache)
    server = _start(installed, UNITS[1], "", cache)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            logs = [(installed.root / f"{unit}.log").read_text()[-2000:] for unit in UNITS]
            assert agent.poll() is None and server.poll() is None, "\n".join(logs)
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the installed server was not healthy in time"
            time.sleep(0.5)
        # Unseeded sampling at the default temperature may draw the demo model's end-of-sequence
        # token before the fourth; greedy and ignore_eos make the count certain.
        reply = httpx.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120,
                           json={"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                                 "ignore_eos": True})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text
        # The agent speaks TLS only, to a party the cluster's CA enrolled.
        server_creds = Credentials.load(own_folder(installed.conf / "certs", None))
        assert _health(f"127.0.0.1:{grpc_port}", server_creds) == health_pb2.HealthCheckResponse.SERVING
        assert _health(f"127.0.0.1:{grpc_port}", None) == -1
    finally:
        for process in (server, agent):  # systemd stops with SIGTERM (KillSignal=)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert (server.returncode, agent.returncode) == (0, 0)


def test_second_run_keeps_the_admins_edits(installed: Installed) -> None:
    edited = {installed.conf / f"agent-{NAME}.env": "POTLUCK_TORCH_THREADS=3\n",
              installed.conf / "server.env": "POTLUCK_API_KEY=edited\n",
              installed.conf / "inventory.yaml": "# edited\n"}  # fmt: skip
    for path, line in edited.items():
        path.write_text(path.read_text() + line)
    certs = installed.conf / "certs"
    enrolled = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    copied = certs / "nodes" / NAME / "key.pem"  # as an admin's copy from another machine lands
    os.chown(copied, 12345, 12345)
    copied.chmod(0o600)
    done = installed.run()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for path, line in edited.items():
        assert path.read_text().endswith(line), f"a second run overwrote {path.name}"
        assert f"kept {path}" in done.stdout
    assert f"kept {certs}" in done.stdout
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == enrolled, "a second run re-keyed"
    key = copied.stat()
    assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (0, pwd.getpwnam(installed.user).pw_gid, 0o640)
    assert "created system user" not in done.stdout and "wrote the demo model" not in done.stdout
    assert "created system user" in installed.output and "wrote the demo model" in installed.output
