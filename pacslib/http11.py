"""A small HTTP/1.1 client on h11 and asyncio streams: kept-alive connections to one server, requests
without a body, responses read whole or streamed.

Why not httpx (which the services use elsewhere): every read of a response goes through httpcore's
and anyio's layers (a cancel scope, locks, events), so receiving a 512 KiB frame costs about 2 ms of
CPU and, on a busy machine, several times that in latency. That was more than decoding, windowing and
encoding the frame together. Here the same bytes are parsed by h11 (the parser httpx itself uses)
straight from an asyncio stream, for about a quarter of the CPU. Render fetches frames from storage
with it, and the embedded gateway relays requests without a body through it.

Connections are kept alive and reused (at most ``max_idle`` idle ones, each for at most
``idle_seconds``, below uvicorn's 5 s keep-alive timeout). A reused connection that the server had
closed before answering anything is replaced and the request sent again (requests here have no body
and are sent again only when the server read nothing of an answer). Any failure to get a complete
response is an ``HttpUnavailableError`` and its connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

READ_SIZE = 1 << 20

HeaderList = Sequence[tuple[str | bytes, str | bytes]]


class HttpUnavailableError(Exception):
    """The server could not be reached, did not answer in time, or broke off its answer."""


class _StaleConnectionError(Exception):
    """A reused connection was closed by the server before it answered anything."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A whole response."""

    status_code: int
    headers: Mapping[str, str]  # lower-case names; repeated fields joined with ", "
    content: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.content)


class _Connection:
    __slots__ = ("idle_since", "protocol", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def usable(self, now: float, idle_seconds: float) -> bool:
        return (
            not self.reader.at_eof() and not self.writer.is_closing() and now - self.idle_since < idle_seconds
        )

    def close(self) -> None:
        self.writer.close()


class StreamedResponse:
    """A response whose head has arrived; its body is read with ``iter_bytes``."""

    def __init__(self, conn: _Connection, head: h11.Response, read_timeout: float) -> None:
        self.status_code = head.status_code
        self.raw_headers: list[tuple[bytes, bytes]] = [(bytes(k), bytes(v)) for k, v in head.headers]
        self.complete = False
        self._conn = conn
        self._read_timeout = read_timeout

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives; HttpUnavailableError when it breaks off."""
        protocol = self._conn.protocol
        try:
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self._read_timeout):
                        data = await self._conn.reader.read(READ_SIZE)
                    protocol.receive_data(data)
                elif isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpUnavailableError("the server closed the connection mid-answer")
        except TimeoutError:
            raise HttpUnavailableError(f"the answer stalled for {self._read_timeout:g} s") from None
        except OSError as exc:
            raise HttpUnavailableError(f"the connection failed ({type(exc).__name__})") from None
        except h11.ProtocolError as exc:
            raise HttpUnavailableError(f"the server's answer is not valid HTTP/1.1 ({exc})") from None


class KeepAliveClient:
    """Requests without a body to one server (``base_url``), over a pool of kept-alive connections.

    ``timeout``: for ``get``, the whole exchange; for ``stream``, getting the response head, and
    then each read of the body.
    """

    def __init__(
        self, base_url: str, *, timeout: float, max_idle: int = 16, idle_seconds: float = 2.0
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._authority = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._timeout = timeout
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._idle: list[_Connection] = []

    async def get(self, path: str, headers: Mapping[str, str]) -> HttpResponse:
        """GET ``path`` (below the base URL) with ``headers``; the whole response."""
        try:
            async with (
                asyncio.timeout(self._timeout),
                self.stream("GET", path, list(headers.items())) as response,
            ):
                content = b"".join([chunk async for chunk in response.iter_bytes()])
        except TimeoutError:
            raise HttpUnavailableError(f"no answer within {self._timeout:g} s") from None
        joined: dict[str, str] = {}
        for name, value in response.raw_headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            joined[key] = f"{joined[key]}, {text}" if key in joined else text
        return HttpResponse(response.status_code, joined, content)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, headers: HeaderList) -> AsyncIterator[StreamedResponse]:
        """Send a request without a body; yield the response once its head has arrived.

        ``headers`` are sent as given (a Host header is added when they have none). The connection
        goes back to the pool only when the body was read to its end.
        """
        fields = [(_bytes(name), _bytes(value)) for name, value in headers]
        if not any(name.lower() == b"host" for name, _ in fields):
            fields.insert(0, (b"host", self._authority.encode("ascii")))
        request = h11.Request(method=method, target=self._prefix + path, headers=fields)
        conn, head = await self._start(request)
        response = StreamedResponse(conn, head, self._timeout)
        try:
            yield response
        finally:
            if response.complete:
                self._give_back(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()

    async def _start(self, request: h11.Request) -> tuple[_Connection, h11.Response]:
        """Send ``request`` and read the response head, on a pooled connection or a new one."""
        try:
            async with asyncio.timeout(self._timeout):
                conn = self._take()
                if conn is not None:
                    with contextlib.suppress(_StaleConnectionError):
                        return conn, await self._send(conn, request)
                conn = await self._open()
                return conn, await self._send(conn, request)
        except TimeoutError:
            raise HttpUnavailableError(f"no answer within {self._timeout:g} s") from None
        except _StaleConnectionError:
            raise HttpUnavailableError("the server closed the connection without answering") from None

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now, self._idle_seconds):
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Connection) -> None:
        protocol = conn.protocol
        if (
            protocol.our_state is h11.DONE
            and protocol.their_state is h11.DONE
            and len(self._idle) < self._max_idle
        ):
            protocol.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._ssl, limit=READ_SIZE
            )
        except OSError as exc:
            raise HttpUnavailableError(f"cannot connect ({type(exc).__name__})") from None
        return _Connection(reader, writer)

    @staticmethod
    async def _send(conn: _Connection, request: h11.Request) -> h11.Response:
        """Send ``request`` on ``conn`` and read the response head; ``conn`` is closed on any failure."""
        protocol = conn.protocol
        received = False
        try:
            conn.writer.write((protocol.send(request) or b"") + (protocol.send(h11.EndOfMessage()) or b""))
            await conn.writer.drain()
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.reader.read(READ_SIZE)
                    if not data and not received:
                        raise _StaleConnectionError
                    received = True
                    protocol.receive_data(data)
                elif isinstance(event, h11.Response):
                    return event
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpUnavailableError("the server closed the connection without answering")
                # h11.InformationalResponse (1xx): the final response follows
        except BaseException as exc:
            conn.close()
            if isinstance(exc, ConnectionError) and not received:
                raise _StaleConnectionError from None
            if isinstance(exc, OSError):
                raise HttpUnavailableError(f"the connection failed ({type(exc).__name__})") from None
            if isinstance(exc, h11.ProtocolError):
                raise HttpUnavailableError(f"the server's answer is not valid HTTP/1.1 ({exc})") from None
            raise


def _bytes(text: str | bytes) -> bytes:
    return text.encode("latin-1") if isinstance(text, str) else text
