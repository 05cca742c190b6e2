"""A local TLS syslog receiver (RFC 5425) for the SIEM export tests, and the test PKI it needs.

``SyslogReceiver`` is an asyncio TLS server on 127.0.0.1 that reads octet-counted frames strictly
(``MSG-LEN SP SYSLOG-MSG``, MSG-LEN without leading zeros) and keeps every message it received, in
order; ``parse_message`` checks an RFC 5424 header field by field. ``Pki`` makes certificate
authorities and certificates with ``cryptography`` into files, as a collector and a client would have.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BOM = b"\xef\xbb\xbf"
MAX_FRAME = 16 << 20


# -- certificates ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


class Pki:
    """Certificate authorities and leaf certificates, written as PEM files under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        path = self.folder / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Ca(name, key, cert, path)

    def issue(
        self, ca: Ca, name: str, *, hosts: tuple[str, ...] = ("localhost",), client: bool = False
    ) -> Issued:
        """A leaf certificate signed by ``ca`` for ``hosts`` (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
            )
            .sign(ca.key, hashes.SHA256())
        )
        cert_path = self.folder / f"{name}.crt"
        key_path = self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return Issued(cert_path, key_path)


def server_context(issued: Issued, client_ca: Path | None = None) -> ssl.SSLContext:
    """The receiver's TLS: its certificate; with ``client_ca``, a client certificate is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(issued.cert, issued.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


# -- RFC 5424 ------------------------------------------------------------------------------------------
_HEADER = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) (?P<timestamp>\S+) (?P<hostname>\S+) "
    rb"(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|\[.*?\])(?: (?P<msg>.*))?",
    re.DOTALL,
)
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


@dataclass(frozen=True)
class SyslogMessage:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes


def parse_message(raw: bytes) -> SyslogMessage:
    """Parse one RFC 5424 message; ValueError naming what does not conform."""
    match = _HEADER.fullmatch(raw)
    if match is None:
        raise ValueError("not an RFC 5424 message")
    fields = {k: v.decode("ascii") for k, v in match.groupdict().items() if k != "msg" and v is not None}
    pri = int(fields["pri"])
    if pri > 191:
        raise ValueError("PRI out of range")
    if not _TIMESTAMP.fullmatch(fields["timestamp"]):
        raise ValueError(f"TIMESTAMP {fields['timestamp']!r} is not RFC 3339 as RFC 5424 restricts it")
    limits = {"hostname": 255, "app": 48, "procid": 128, "msgid": 32}
    for key, limit in limits.items():
        if len(fields[key]) > limit:
            raise ValueError(f"{key} is longer than {limit}")
    return SyslogMessage(
        pri=pri,
        version=int(fields["version"]),
        timestamp=fields["timestamp"],
        hostname=fields["hostname"],
        app_name=fields["app"],
        procid=fields["procid"],
        msgid=fields["msgid"],
        structured_data=fields["sd"],
        msg=match.group("msg") or b"",
    )


# -- the receiver ----------------------------------------------------------------------------------------
@dataclass
class SyslogReceiver:
    """An RFC 5425 receiver on 127.0.0.1; ``port`` 0 picks a free one (kept across restarts)."""

    context: ssl.SSLContext
    port: int = 0
    messages: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    handshakes: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self.context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection (what a collector going down looks like)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # at once: no TLS shutdown handshake with a client that never reads
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        self._writers.add(writer)
        try:
            while True:
                length = await self._length(reader)
                if length is None:
                    return
                message = await reader.readexactly(length)
                async with self._arrived:
                    self.messages.append(message)
                    self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            self.errors.append(type(exc).__name__)
        except ValueError as exc:
            self.errors.append(str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _length(reader: asyncio.StreamReader) -> int | None:
        digits = b""
        while True:
            char = await reader.read(1)
            if not char:
                if digits:
                    raise ValueError("the connection closed inside a frame header")
                return None
            if char == b" ":
                break
            if not char.isdigit() or len(digits) >= 9:
                raise ValueError(f"bad octet-counting frame header {digits + char!r}")
            digits += char
        if not digits or digits.startswith(b"0"):
            raise ValueError(f"bad MSG-LEN {digits!r}")
        length = int(digits)
        if length > MAX_FRAME:
            raise ValueError("frame too large")
        return length

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[bytes]:
        """The first ``count`` messages, once they have arrived (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= count)
        return self.messages[:count]
