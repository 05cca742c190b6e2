"""Forwarding spooled audit messages to a hospital SIEM: syslog (RFC 5424) over TLS (RFC 5425).

Each message is ``<85>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``: facility 10
(security/authorization) and severity 5 (notice) as IHE ATNA asks, no structured data, and the A.5 XML
as a UTF-8 MSG that starts with a byte-order mark (RFC 5424 6.4). On the wire each message is framed by
octet counting, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 4.3).

TLS: the collector's certificate must chain to the configured CA bundle (only that bundle, not the
system CAs) and name the configured host; TLS 1.2 or newer; an optional client certificate for mutual
TLS. A collector that is down, refuses the handshake or presents another certificate leaves the
messages in the spool, and delivery is retried with exponential backoff (capped, with jitter).

Delivery: RFC 5425 has no application-level acknowledgment, so a message counts as delivered once the
collector's TCP stack has acknowledged every byte of it (the socket's send queue is empty, Linux
``TIOCOUTQ``); only then is it removed from the spool. A connection that breaks before that has its
whole batch sent again on the next connection, in order: the collector may then see a message twice
(at-least-once), never out of order and never not at all. What a collector loses after acknowledging
bytes (its own crash before writing them) is beyond what RFC 5425 can tell.

The socket work is blocking ``ssl`` in a worker thread (``asyncio.to_thread``): a blocking
``sendall`` returns only once everything is in the kernel, which is what the acknowledgment check needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import select
import socket
import ssl
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.audit.spool import Spool, SpooledMessage

log = logging.getLogger("pacs.audit.siem")

BOM = b"\xef\xbb\xbf"
PRI = 10 * 8 + 5  # facility 10 security/authorization, severity 5 notice (IHE ATNA)
APP_NAME = "cloudpacs-audit"
BATCH = 100
BATCH_BYTES = 1 << 20
ACCEPTANCE_WAIT = 0.5


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``limit`` characters."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(
    xml: bytes, *, timestamp: str, hostname: str, msgid: str, procid: str = "-", app_name: str = APP_NAME
) -> bytes:
    """An RFC 5424 message whose MSG is ``xml`` (UTF-8, with BOM); ``timestamp`` is RFC 3339 UTC."""
    header = " ".join(
        [
            f"<{PRI}>1",
            _header_field(timestamp, 64),
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            _header_field(msgid, 32),
            "-",
        ]
    )
    return header.encode("ascii") + b" " + BOM + xml


def frame(message: bytes) -> bytes:
    """Octet-counting framing (RFC 5425 4.3): ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """Client TLS for the collector: verified against ``ca_file`` only, TLS 1.2+, optional client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    return context


@dataclass(frozen=True)
class SyslogTarget:
    """Where to send: the collector's address, the name its certificate must carry, and the TLS context."""

    host: str
    port: int
    server_name: str
    context: ssl.SSLContext
    connect_timeout: float = 10.0
    send_timeout: float = 30.0
    ack_timeout: float = 10.0


def _unacknowledged(sock: socket.socket) -> int | None:
    """Bytes the peer's TCP has not acknowledged yet (Linux TIOCOUTQ); None where it cannot be asked."""
    request = getattr(termios, "TIOCOUTQ", None)
    if request is None:
        return None
    try:
        answer = fcntl.ioctl(sock.fileno(), request, struct.pack("i", 0))
    except OSError:
        return None
    return int(struct.unpack("i", answer)[0])


class TlsConnection:
    """One TLS connection to the collector (blocking calls: run them in a worker thread)."""

    def __init__(self, sock: ssl.SSLSocket, target: SyslogTarget) -> None:
        self._sock = sock
        self._target = target

    @classmethod
    def open(cls, target: SyslogTarget) -> TlsConnection:
        """Connect and complete the handshake (certificate verified); OSError / ssl.SSLError otherwise."""
        raw = socket.create_connection((target.host, target.port), timeout=target.connect_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = target.context.wrap_socket(raw, server_hostname=target.server_name)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(target.send_timeout)
        connection = cls(tls, target)
        if tls.version() == "TLSv1.3":
            connection._await_acceptance()
        return connection

    def _await_acceptance(self) -> None:
        """Wait briefly for the collector's first records after a TLS 1.3 handshake.

        In TLS 1.3 the client finishes its handshake before the server has checked the client
        certificate, so a collector that refuses it says so only afterwards; bytes sent meanwhile would
        be acknowledged by its TCP and lost. The server's session tickets (or its refusal) arrive within
        a round trip; without tickets this waits ``ACCEPTANCE_WAIT`` once per connection.
        """
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        poller.poll(int(min(ACCEPTANCE_WAIT, self._target.connect_timeout) * 1000))
        try:
            self._check_open()
        except BaseException:
            self.close()
            raise

    def _check_open(self) -> None:
        """Raise ConnectionError when the collector has closed the connection (it never sends data)."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0) and not self._sock.pending():
            return
        self._sock.settimeout(0.0)
        try:
            while True:
                data = self._sock.recv(4096)
                if not data:
                    raise ConnectionError("the collector closed the connection")
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # TLS records without data (e.g. TLS 1.3 session tickets): still open
        except ssl.SSLZeroReturnError:
            raise ConnectionError("the collector closed the connection") from None
        finally:
            self._sock.settimeout(self._target.send_timeout)

    def send(self, data: bytes) -> None:
        """Send ``data`` and wait until the collector's TCP has acknowledged all of it.

        ConnectionError / OSError when the connection broke or the acknowledgment did not come in time
        (the caller then sends the same data again on a new connection).
        """
        self._check_open()
        self._sock.sendall(data)
        deadline = time.monotonic() + self._target.ack_timeout
        pause = 0.0005
        while True:
            left = _unacknowledged(self._sock)
            if left is None or left == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the collector did not acknowledge {left} bytes in time")
            self._check_open()
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def abort(self) -> None:
        """Wake a blocked send (from another thread) by shutting the socket down."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


@dataclass
class ForwarderStatus:
    """What the forwarder has done: delivered messages, connection state, the last error (no content)."""

    delivered: int = 0
    connected: bool = False
    last_error: str | None = None
    failing_since: float | None = None
    attempts: int = 0


def describe(exc: BaseException) -> str:
    """A connection error as text fit for a log: its kind and reason, never message content."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the collector's certificate was refused ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class SyslogForwarder:
    """Sends the spool's messages to the collector, oldest first, removing each batch once acknowledged.

    ``payload(message)`` turns a spooled message into the syslog message bytes (decrypting it).
    """

    def __init__(
        self,
        spool: Spool,
        target: SyslogTarget,
        payload: Callable[[SpooledMessage], Awaitable[bytes]],
        *,
        retry_initial: float = 0.5,
        retry_max: float = 60.0,
        poll: float = 1.0,
        batch: int = BATCH,
    ) -> None:
        self._spool = spool
        self._target = target
        self._payload = payload
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._poll = poll
        self._batch = batch
        self._connection: TlsConnection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.status = ForwarderStatus()

    def notify(self) -> None:
        """Something was spooled: send it now rather than at the next poll."""
        self._wake.set()

    async def _batch_bytes(self, messages: Sequence[SpooledMessage]) -> tuple[bytes, int]:
        """The framed bytes of the first messages of ``messages`` (at most BATCH_BYTES unless one is
        larger) and the sequence number of the last one taken."""
        parts: list[bytes] = []
        size = 0
        last = messages[0].seq
        for message in messages:
            framed = frame(await self._payload(message))
            if parts and size + len(framed) > BATCH_BYTES:
                break
            parts.append(framed)
            size += len(framed)
            last = message.seq
        return b"".join(parts), last

    async def send_once(self) -> int:
        """Send one batch of the oldest messages; return how many were delivered (0: spool empty).

        Connection and TLS errors propagate; the batch then stays in the spool.
        """
        messages = await self._spool.oldest(self._batch)
        if not messages:
            return 0
        data, last = await self._batch_bytes(messages)
        if self._connection is None:
            self._connection = await asyncio.to_thread(TlsConnection.open, self._target)
            self.status.connected = True
        try:
            await asyncio.to_thread(self._connection.send, data)
        except BaseException:
            self._drop_connection()
            raise
        removed = await self._spool.remove_through(last)
        self.status.delivered += removed
        return removed

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        self.status.connected = False
        if connection is not None:
            connection.close()

    async def _run(self) -> None:
        delay = self._retry_initial
        while True:
            try:
                sent = await self.send_once()
            except Exception as exc:  # any failure: the batch stays spooled and is sent again later
                self._failed(exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter, not a secret
                delay = min(delay * 2, self._retry_max)
                continue
            if self.status.failing_since is not None:
                waited = time.monotonic() - self.status.failing_since
                log.info("SIEM collector reachable again after %.1f s; delivery resumed", waited)
                self.status.failing_since = None
                self.status.last_error = None
            delay = self._retry_initial
            if sent == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    def _failed(self, exc: BaseException) -> None:
        reason = describe(exc)
        self.status.attempts += 1
        if self.status.failing_since is None or reason != self.status.last_error:
            log.warning(
                "cannot deliver audit messages to the SIEM collector %s:%d: %s; they stay spooled and "
                "delivery is retried",
                self._target.host,
                self._target.port,
                reason,
            )
        if self.status.failing_since is None:
            self.status.failing_since = time.monotonic()
        self.status.last_error = reason

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-siem-forwarder")

    async def stop(self) -> None:
        """Stop sending (a batch not yet acknowledged stays spooled and is sent again next time)."""
        if self._connection is not None:
            self._connection.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._drop_connection()
