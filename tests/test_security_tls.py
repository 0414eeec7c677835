"""mqtts:// end to end: a throwaway CA and server certificate, Mosquitto with a TLS
listener (and the production security model), the bridge, a claim and the reference
kiosk agent, all verifying the broker's certificate.

The bridge (``ssl.create_default_context()``) and the agent (paho's ``tls_set()``) trust
only the system's CAs, so the test points OpenSSL's ``SSL_CERT_FILE`` at the throwaway
CA; a real deployment with a private CA needs a setting for it (see the report).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import claim_credentials
from bridge.security.admin_link import open_admin_link
from bridge.service.buffered_socket import BufferedSocket
from bridge.testing.mosquitto import MosquittoNotFound
from bridge.testing.secure_broker import (
    AuthClient,
    SecureBroker,
    running_secure_bridge,
    secure_broker,
)
from schemas.provisioning import ProvisionAccepted
from tests.support.bridge_harness import Db, eventually
from tests.support.ports import free_port
from tests.support.services import service_unavailable


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(directory: Path, common: str = "kiosk-bridge test CA") -> Pki:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.key.chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureBroker, Pki]]:
    base = tmp_path_factory.mktemp("secure-tls")
    pki = make_pki(base / "pki")
    port = free_port()
    conf = "\n".join(
        [
            f"listener {port} 127.0.0.1",
            f"certfile {pki.cert}",
            f"keyfile {pki.key}",
            "tls_version tlsv1.2",
        ]
    )
    try:
        broker = secure_broker(base / "broker", extra_conf=conf).start()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    tls_broker = SecureBroker(broker.process, broker.secrets, scheme="mqtts", listener_port=port)
    try:
        yield tls_broker, pki
    finally:
        broker.kill()


async def test_bridge_claim_and_agent_over_verified_tls(
    tls: tuple[SecureBroker, Pki],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, pki = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    async with running_secure_bridge(broker.bridge_url, sqlite_url):
        answer = await asyncio.to_thread(
            claim_credentials,
            broker.url(),
            broker.users.claim,
            broker.secrets.claim_password,
            "tls-kiosk",
            ca_file=str(pki.ca),
        )
        assert isinstance(answer, ProvisionAccepted)
        agent = KioskAgent(
            "tls-kiosk",
            broker.url().replace("127.0.0.1", "localhost"),
            password=answer.token,
            state_dir=tmp_path / "k",
            fsync=False,
        )
        db = Db(sqlite_url)
        try:
            await asyncio.to_thread(agent.start, 20)
            await eventually(lambda: db.status_of("tls-kiosk"), lambda s: s == "Connected")
        finally:
            await asyncio.to_thread(agent.close)
            db.close()
    log = broker.process.log_text()
    assert "as tls-kiosk" in log


# paho leaves the socket of a failed TLS handshake to the garbage collector (paho 2.2,
# Client._ssl_wrap_socket); its ResourceWarning is collected below, inside this test.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_clients_refuse_a_certificate_from_another_ca(
    tls: tuple[SecureBroker, Pki], tmp_path: Path
) -> None:
    broker, _pki = tls
    stranger = make_pki(tmp_path / "other", common="someone else's CA")
    context = ssl.create_default_context(cafile=str(stranger.ca))
    with (
        socket.create_connection((broker.host, broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")
    # The agent's and the bridge's own clients (paho underneath both) refuse it too.
    client = AuthClient(broker.bridge_url, client_id="tls-untrusted", ca_file=str(stranger.ca))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.connect()
    finally:
        client.close()
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        async with open_admin_link(broker.bridge_url, ca_file=str(stranger.ca)):
            pass
    gc.collect()


def test_buffered_reads_over_tls_count_what_the_tls_layer_holds(tmp_path: Path) -> None:
    """The bridge's buffered socket over a real TLS session (what ``mqtts://`` gives
    paho): small reads are served from one TLS read, and the stream arrives whole."""
    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.cert, pki.key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 400  # 100 KiB, many TLS records
    with ThreadPoolExecutor(1) as pool:

        def serve() -> None:
            with server_ctx.wrap_socket(left, server_side=True) as server:
                for start in range(0, len(payload), 700):
                    server.sendall(payload[start : start + 700])

        sent = pool.submit(serve)
        client = client_ctx.wrap_socket(right, server_hostname="localhost")
        try:
            reader = BufferedSocket(client)
            got = bytearray()
            most_pending = 0
            while len(got) < len(payload):
                chunk = reader.recv(1 if len(got) % 3 else 4_000)
                assert chunk, "stream ended early"
                got += chunk
                most_pending = max(most_pending, reader.pending())
            sent.result(timeout=30)
        finally:
            client.close()
    assert bytes(got) == payload
    # Small reads were served from what one TLS read brought in, and it all drained.
    assert most_pending > 0
    assert reader.pending() == 0
