"""Who may talk to whom: the cluster's mutual TLS, shared by the server, the scheduler and agents.

Every party holds a certificate signed by the cluster's own CA (`potluck certs`, or a throwaway CA
that `potluck up` makes) in a folder of three PEM files: `ca.pem` (the CA's certificate, never its
key), `cert.pem` and `key.pem`. A certificate names one identity in its subject alternative name:

    server.potluck            the scheduler (it calls agents; nothing calls it over gRPC)
    <name>.agent.potluck      the inventory node <name>

A caller checks the identity it expects, not the address it dials: a channel to agent `laptop`
accepts only `laptop.agent.potluck` (gRPC's target name override), so a wrong or hostile address
in a message cannot make anyone talk to a party outside the cluster. An agent checks who calls
it (`caller`): control calls only from the server, peer calls from the server or an agent.

`Credentials = None` everywhere means plaintext: only with an explicit `--insecure`.

    creds = Credentials.load(Path("/etc/potluck/certs"))
    channel = open_channel("10.0.0.7:50051", agent_identity("laptop"), creds, options)
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

AGENT_SUFFIX = ".agent.potluck"
SERVER_IDENTITY = "server.potluck"
FILES = ("ca.pem", "cert.pem", "key.pem")


class CredentialsError(ValueError):
    """A certificate folder that cannot be used, with what to do about it."""


def agent_identity(name: str) -> str:
    """The identity an agent's certificate names (a DNS name: node names are letters, digits,
    '.', '_' and '-')."""
    return f"{name}{AGENT_SUFFIX}"


def ours(identity: str) -> bool:
    """Whether a certificate name is a potluck identity (the server's or an agent's)."""
    return identity == SERVER_IDENTITY or identity.endswith(AGENT_SUFFIX)


def agent_name(identity: str) -> str | None:
    """The agent a certificate identity names, or None if it names no agent."""
    return identity[: -len(AGENT_SUFFIX)] if identity.endswith(AGENT_SUFFIX) else None


@dataclass(frozen=True)
class Credentials:
    """One party's TLS material, PEM-encoded."""

    ca: bytes  # the cluster CA's certificate: the only issuer any peer's certificate may have
    cert: bytes  # this party's certificate, signed by the CA
    key: bytes  # this party's private key
    identity: str  # what the certificate names: SERVER_IDENTITY or agent_identity(name)

    @classmethod
    def load(cls, folder: Path) -> Credentials:
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise CredentialsError(f"certificate folder {folder} lacks {', '.join(missing)}: create the cluster's "
                                   f"certificates with `potluck certs --inventory FILE --out DIR` and copy DIR/<node> "
                                   f"to the device (or run with --insecure, plaintext)")
        ca, cert, key = ((folder / f).read_bytes() for f in FILES)
        return cls(ca, cert, key, certificate_identity(cert, folder / "cert.pem"))

    def grpc_server(self) -> grpc.ServerCredentials:
        """A gRPC server that only accepts clients with a certificate from the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def grpc_channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def ssl_context(self, server_side: bool) -> ssl.SSLContext:
        """For the decode data plane (plain TCP): TLS with a certificate from the CA required on
        both sides; the caller checks the peer's identity itself (`ssl_identity`)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False  # the identity is checked against the expected agent instead
        _load_chain(ctx, self.cert, self.key)
        return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl takes a certificate chain only from a file: a temporary one, private to this user (0600)
    # and deleted at once.
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(cert + b"\n" + key)
        f.flush()
        ctx.load_cert_chain(f.name)


def certificate_identity(cert: bytes, where: Path | str = "certificate") -> str:
    """The potluck identity a PEM certificate names (its first DNS subject alternative name)."""
    try:
        parsed = x509.load_pem_x509_certificate(cert)
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CredentialsError(f"{where} is not a potluck certificate: {exc}") from None
    identities = [n for n in names.get_values_for_type(x509.DNSName) if ours(n)]
    if not identities:
        raise CredentialsError(f"{where} names no potluck identity (expected {SERVER_IDENTITY} or "
                               f"<node>{AGENT_SUFFIX})")
    return identities[0]


def open_channel(address: str, identity: str, creds: Credentials | None,
                 options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to `address` that accepts only a peer whose certificate names `identity`."""
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds.grpc_channel(),
                                   options=[*options, ("grpc.ssl_target_name_override", identity)])


def open_blocking_channel(address: str, identity: str, creds: Credentials | None) -> grpc.Channel:
    """A blocking channel (the launcher's health probe), checked as `open_channel`."""
    if creds is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, creds.grpc_channel(), options=[("grpc.ssl_target_name_override", identity)])


def caller(context: Any) -> str | None:
    """The identity of a gRPC call's peer, from its verified certificate (None: no certificate)."""
    names = context.auth_context().get("x509_subject_alternative_name", [])
    return next((n.decode() for n in names if ours(n.decode())), None)


def ssl_identity(peercert: dict[str, Any] | None) -> str | None:
    """The identity of a TLS socket's peer (`SSLObject.getpeercert()`), or None."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "DNS" and ours(value):
            return str(value)
    return None


async def probe_peer(address: str, creds: Credentials, timeout_s: float = 5.0) -> str | None:
    """Why a TLS channel to `address` fails, in an admin's words, from a handshake of our own:
    the identity its certificate names ("agent <name>"), "a certificate from another CA", "no
    TLS" (an agent started with --insecure), or None when nothing answers."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port), ssl=creds.ssl_context(server_side=False)), timeout_s)
    except ssl.SSLCertVerificationError:
        return "a certificate from another CA"
    except ssl.SSLError:
        return "no TLS"
    except (OSError, TimeoutError, ValueError):
        return None
    try:
        who = ssl_identity(writer.get_extra_info("peercert"))
    finally:
        writer.close()
    name = agent_name(who) if who else None
    return f"agent {name}" if name is not None else who
