"""Enrolment: `potluck certs` writes a CA and a certificate per node and for the server, keeps
them when run again, and the agent and server refuse a folder that is not theirs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protos.security import SERVER_IDENTITY, Credentials, CredentialsError, agent_identity, certificate_identity
from server.certs import own_folder
from server.cli import main


def inventory(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text("nodes:\n" + "".join(f"  - name: {n}\n    address: 127.0.0.1:{5000 + i}\n    expert_memory: 1GiB\n"
                                         for i, n in enumerate(names)))
    return path


def test_certs_enrols_every_node_and_the_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--inventory", str(inventory(tmp_path, "laptop", "pi")), "--out", str(out)]) == 0
    for folder, identity in (("server", SERVER_IDENTITY), ("nodes/laptop", agent_identity("laptop")),
                             ("nodes/pi", agent_identity("pi"))):
        creds = Credentials.load(out / folder)
        assert creds.identity == identity and creds.ca == (out / "ca.pem").read_bytes()
        assert stat.S_IMODE((out / folder / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    # Run again with a new node: the CA and the existing certificates stay.
    before = {p: p.read_bytes() for p in out.rglob("*.pem")}
    capsys.readouterr()
    assert main(["certs", "--inventory", str(inventory(tmp_path, "laptop", "pi", "tablet")), "--out", str(out)]) == 0
    assert all(p.read_bytes() == data for p, data in before.items())
    assert certificate_identity((out / "nodes/tablet/cert.pem").read_bytes()) == agent_identity("tablet")
    text = capsys.readouterr().out
    assert "wrote" in text and "nodes/tablet" in text and "kept" in text
    assert own_folder(out, "pi") == out / "nodes/pi" and own_folder(out, None) == out / "server"


def test_agent_and_server_refuse_missing_or_foreign_certificates(tmp_path: Path, qwen_tiny: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    inv = inventory(tmp_path, "laptop", "pi")
    assert main(["certs", "--inventory", str(inv), "--out", str(out)]) == 0
    agent = ["agent", "--listen", "127.0.0.1:1", "--model", str(qwen_tiny), "--name", "laptop"]

    def refused(argv: list[str], *fragments: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert all(f in err for f in fragments), err

    refused(agent, "give --certs DIR", "or --insecure")
    refused([*agent, "--certs", str(out / "nodes/pi")], "certificate of pi.agent.potluck", "not of node 'laptop'")
    refused([*agent, "--certs", str(tmp_path)], "lacks ca.pem, cert.pem, key.pem", "potluck certs")
    serve = ["serve", "--inventory", str(inv), "--model", str(qwen_tiny), "--port", "1"]
    refused(serve, "give --certs DIR", "or --insecure")
    refused([*serve, "--certs", str(out / "nodes/pi")], "not the server's")
    with pytest.raises(SystemExit):
        main([*agent, "--certs", str(out), "--insecure"])  # one or the other


def test_a_half_written_ca_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "ca.pem").write_text("x")
    with pytest.raises(ValueError, match="half a CA"):
        from server.certs import enrol
        enrol(out, ["a"])
    with pytest.raises(CredentialsError, match="not a potluck certificate"):
        certificate_identity(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
