"""pacslib.http11 (render's client for storage, the gateway's for requests without a body), against real TCP servers that answer as told: connections are
kept alive and reused, a connection the server closed while idle is replaced without the caller
noticing, and every way of not getting a complete answer is an HttpUnavailableError."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from pacslib.http11 import HttpUnavailableError, KeepAliveClient

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # request head -> keep the connection?


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


def _ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        state = Server("")

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    state.requests.append(head)
                    if not await handler(head, writer):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/base/"
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_connections_are_kept_alive_and_reused(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(_ok(b"frame " + head.split(b" ")[1], 'ETag: "o.1"\r\nX-Pixel-Module-Length: 2\r\n'))
        return True

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        for n in range(3):
            r = await client.get(f"/frames/{n}", {"X-On-Behalf-Of": "Bearer t"})
            assert r.status_code == 200
            assert r.content == f"frame /base/frames/{n}".encode()
            assert r.header("etag") == '"o.1"'
            assert r.header("X-PIXEL-MODULE-LENGTH") == "2"
    finally:
        await client.aclose()
    assert server.connections == 1
    assert b"GET /base/frames/0 HTTP/1.1" in server.requests[0]
    assert b"host: 127.0.0.1:" in server.requests[0].lower()
    assert b"x-on-behalf-of: bearer t" in server.requests[0].lower()


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(_ok(b"ok"))
        await writer.drain()
        return False  # answer, then close the connection (as a server's keep-alive timeout does)

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        assert (await client.get("/a", {})).content == b"ok"
        await asyncio.sleep(0.05)
        assert (await client.get("/b", {})).content == b"ok"
    finally:
        await client.aclose()
    assert server.connections == 2


async def test_a_reused_connection_that_dies_unanswered_is_retried_once(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    answered = 0

    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if b"/second" in head and answered == 1:
            answered += 1
            return False  # read the request, close without a word
        answered += 1
        writer.write(_ok(b"ok"))
        return True

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        assert (await client.get("/first", {})).content == b"ok"
        assert (await client.get("/second", {})).content == b"ok"
    finally:
        await client.aclose()
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_chunked_answers_and_repeated_headers(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nVary: a\r\nVary: b\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        return True

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        r = await client.get("/x", {})
        assert (r.status_code, r.content, r.header("vary")) == (404, b"hello world", "a, b")
        assert (await client.get("/y", {})).content == b"hello world"
    finally:
        await client.aclose()
    assert server.connections == 1


async def test_a_large_body_arrives_whole(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, more than one read

    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(_ok(body))
        return True

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        assert (await client.get("/big", {})).content == body
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",  # broken off mid-body
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # broken off mid-head
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_an_incomplete_or_invalid_answer_is_unavailable(
    serve: Callable[[Handler], Awaitable[Server]], answer: bytes
) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        await writer.drain()
        return False

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=5)
    try:
        with pytest.raises(HttpUnavailableError):
            await client.get("/x", {})
    finally:
        await client.aclose()


async def test_a_silent_server_times_out(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    server = await serve(handler)
    client = KeepAliveClient(server.url, timeout=0.2)
    try:
        with pytest.raises(HttpUnavailableError, match=r"no answer within 0\.2 s"):
            await client.get("/x", {})
    finally:
        await client.aclose()


async def test_nobody_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        client = KeepAliveClient(f"http://127.0.0.1:{port}", timeout=2)
        with pytest.raises(HttpUnavailableError, match="cannot connect"):
            await client.get("/x", {})
        await client.aclose()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        KeepAliveClient("ftp://storage:21", timeout=1)
