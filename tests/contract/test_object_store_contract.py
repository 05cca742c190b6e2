"""The ObjectStore contract, run against every adapter (filesystem and S3 on a real gateway)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from minio.error import S3Error

from services.storage.adapters.filesystem import FilesystemObjectStore
from services.storage.ports import ObjectNotFoundError, ObjectStore
from tests.conftest import S3Endpoint
from tests.contract.conftest import make_s3_store

MiB = 1 << 20


class ProducerFailedError(Exception):
    """Raised by a test's chunk stream to simulate a client that disconnects mid-upload."""


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def split(data: bytes, sizes: Iterable[int]) -> AsyncIterator[bytes]:
    """Yield ``data`` in chunks whose sizes cycle through ``sizes``."""
    view = memoryview(data)
    offset = 0
    for size in itertools.cycle(sizes):
        if offset >= len(view):
            return
        yield bytes(view[offset : offset + size])
        offset += size
        await asyncio.sleep(0)


async def read_all(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in await store.read(key, start, end)])


async def all_keys(store: ObjectStore, prefix: str = "") -> set[str]:
    return {key async for key in store.keys(prefix)}


async def test_put_read_size_delete(object_store: ObjectStore) -> None:
    key = "studies/1/object-a"

    assert await object_store.put(key, chunks_of(b"hello ", b"", b"world")) == 11

    assert await object_store.size(key) == 11
    assert await read_all(object_store, key) == b"hello world"
    assert await object_store.read_range(key, 0, 5) == b"hello"
    assert await all_keys(object_store) == {key}
    await object_store.delete(key)
    assert await object_store.size(key) is None
    assert await all_keys(object_store) == set()
    await object_store.delete(key)  # deleting a missing object is not an error


async def test_overwrite_replaces_the_whole_object(object_store: ObjectStore) -> None:
    await object_store.put("k", chunks_of(b"a much longer first version"))

    assert await object_store.put("k", chunks_of(b"short")) == 5

    assert await read_all(object_store, "k") == b"short"
    assert await object_store.size("k") == 5


async def test_missing_key(object_store: ObjectStore) -> None:
    assert await object_store.size("missing/key") is None
    with pytest.raises(ObjectNotFoundError):
        await object_store.read("missing/key")
    with pytest.raises(ObjectNotFoundError):
        await object_store.read("missing/key", 0, 0)
    with pytest.raises(ObjectNotFoundError):
        await object_store.read_range("missing/key", 0, 10)
    with pytest.raises(ObjectNotFoundError):
        await object_store.read_range("missing/key", 3, 3)


async def test_empty_object(object_store: ObjectStore) -> None:
    assert await object_store.put("empty", chunks_of()) == 0

    assert await object_store.size("empty") == 0
    assert await read_all(object_store, "empty") == b""
    assert await read_all(object_store, "empty", 0, 10) == b""
    assert await object_store.read_range("empty", 0, 10) == b""
    assert await all_keys(object_store) == {"empty"}


async def test_large_object_streams_in_odd_chunks(object_store: ObjectStore) -> None:
    data = os.urandom(20 * MiB + 12345)
    digest = hashlib.sha256(data).hexdigest()

    size = await object_store.put("big/object", split(data, [1, 4093, 65537, 1_000_003, 7, 333_333]))

    assert size == len(data)
    assert await object_store.size("big/object") == len(data)
    read_digest = hashlib.sha256()
    chunk_count = 0
    async for chunk in await object_store.read("big/object"):
        read_digest.update(chunk)
        chunk_count += 1
    assert read_digest.hexdigest() == digest
    assert chunk_count > 1  # streamed, not returned in one piece
    middle = 10 * MiB + 17
    assert (
        await object_store.read_range("big/object", middle, middle + 300_001)
        == data[middle : middle + 300_001]
    )
    tail = await read_all(object_store, "big/object", len(data) - 5 * MiB - 3)
    assert tail == data[len(data) - 5 * MiB - 3 :]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 0),
        (0, 1),
        (0, 10_240),
        (5, 5),
        (1000, 1001),
        (10_239, 10_240),
        (10_240, 10_240),
        (10_000, 20_000),  # crosses the end: shorter
        (10_240, 10_300),  # starts at the end: empty
        (20_000, 30_000),  # starts past the end: empty
    ],
)
async def test_ranges_at_edges(object_store: ObjectStore, start: int, end: int) -> None:
    data = bytes(range(256)) * 40  # 10 240 bytes
    await object_store.put("ranged", chunks_of(data))

    assert await object_store.read_range("ranged", start, end) == data[start:end]
    assert await read_all(object_store, "ranged", start, end) == data[start:end]
    assert await read_all(object_store, "ranged", start) == data[start:]


async def test_invalid_ranges_are_rejected(object_store: ObjectStore) -> None:
    await object_store.put("ranged", chunks_of(b"0123456789"))

    with pytest.raises(ValueError, match="range"):
        await object_store.read_range("ranged", 5, 4)
    with pytest.raises(ValueError, match="range"):
        await object_store.read("ranged", -1)


@pytest.mark.parametrize("existing", [None, b"the old version"])
async def test_failed_put_leaves_previous_state(object_store: ObjectStore, existing: bytes | None) -> None:
    if existing is not None:
        await object_store.put("obj", chunks_of(existing))

    async def failing() -> AsyncIterator[bytes]:
        for _ in range(12):  # 12 MiB: more than two S3 parts were sent before the failure
            yield os.urandom(MiB)
        raise ProducerFailedError("client went away")

    with pytest.raises(ProducerFailedError):
        await object_store.put("obj", failing())

    if existing is None:
        assert await object_store.size("obj") is None
        assert await all_keys(object_store) == set()
    else:
        assert await read_all(object_store, "obj") == existing
        assert await all_keys(object_store) == {"obj"}


async def test_readers_never_see_a_partial_object(object_store: ObjectStore) -> None:
    old = b"old content " * 1000
    await object_store.put("obj", chunks_of(old))
    first_sent = asyncio.Event()
    release = asyncio.Event()
    new = os.urandom(3 * MiB)

    async def slow() -> AsyncIterator[bytes]:
        yield new[:MiB]
        first_sent.set()
        await release.wait()
        yield new[MiB:]

    writer = asyncio.create_task(object_store.put("obj", slow()))
    await asyncio.wait_for(first_sent.wait(), 10)
    await asyncio.sleep(0.05)  # let the adapter write what it has

    assert await read_all(object_store, "obj") == old
    assert await object_store.size("obj") == len(old)
    assert await all_keys(object_store) == {"obj"}
    release.set()
    assert await writer == len(new)
    assert await read_all(object_store, "obj") == new


async def test_cancelled_put_leaves_previous_state(object_store: ObjectStore) -> None:
    await object_store.put("obj", chunks_of(b"old"))
    first_sent = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"new data that never completes"
        first_sent.set()
        await asyncio.Event().wait()  # never set
        yield b"unreachable"

    writer = asyncio.create_task(object_store.put("obj", stalled()))
    await asyncio.wait_for(first_sent.wait(), 10)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    await asyncio.sleep(0.1)  # a worker thread may still be winding down

    assert await read_all(object_store, "obj") == b"old"
    assert await all_keys(object_store) == {"obj"}


async def test_concurrent_puts_of_one_key_leave_one_whole_version(object_store: ObjectStore) -> None:
    one, two = os.urandom(2 * MiB), os.urandom(2 * MiB)

    await asyncio.gather(
        object_store.put("obj", split(one, [100_000])),
        object_store.put("obj", split(two, [70_001])),
    )

    assert await read_all(object_store, "obj") in (one, two)


async def test_keys_by_prefix(object_store: ObjectStore) -> None:
    for key in ["p/1", "p/2", "p/sub/3", "px", "q", "p-dash"]:
        await object_store.put(key, chunks_of(key.encode()))

    assert await all_keys(object_store) == {"p/1", "p/2", "p/sub/3", "px", "q", "p-dash"}
    assert await all_keys(object_store, "p/") == {"p/1", "p/2", "p/sub/3"}
    assert await all_keys(object_store, "p") == {"p/1", "p/2", "p/sub/3", "px", "p-dash"}
    assert await all_keys(object_store, "p/s") == {"p/sub/3"}
    assert await all_keys(object_store, "p/sub/3") == {"p/sub/3"}
    assert await all_keys(object_store, "none") == set()


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/absolute",
        "a/../b",
        "..",
        ".",
        "a//b",
        "a/",
        "with space",
        "ümlaut",
        "a\\b",
        "nul\x00",
        "a/./b",
        "x~y",
    ],
)
async def test_invalid_keys_are_rejected(object_store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        await object_store.put(key, chunks_of(b"x"))
    with pytest.raises(ValueError, match="key"):
        await object_store.read(key)
    with pytest.raises(ValueError, match="key"):
        await object_store.read_range(key, 0, 1)
    with pytest.raises(ValueError, match="key"):
        await object_store.size(key)
    with pytest.raises(ValueError, match="key"):
        await object_store.delete(key)
    assert await all_keys(object_store) == set()


async def test_abandoned_read_streams_release_their_resources(object_store: ObjectStore) -> None:
    data = os.urandom(2 * MiB)
    await object_store.put("obj", chunks_of(data))

    for _ in range(40):
        stream = await object_store.read("obj")
        assert len(await anext(stream)) > 0
        aclose = getattr(stream, "aclose", None)
        assert aclose is not None
        await aclose()

    assert await read_all(object_store, "obj") == data


async def test_ping(object_store: ObjectStore) -> None:
    await object_store.ping()


async def test_filesystem_modes_and_no_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemObjectStore(root)

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ProducerFailedError("client went away")

    await store.put("a/b/obj", chunks_of(b"data"))
    with pytest.raises(ProducerFailedError):
        await store.put("a/b/other", failing())

    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "a" / "b" / "obj").stat().st_mode) == 0o600
    assert sorted(p.name for p in (root / "a" / "b").iterdir()) == ["obj"]  # no temporary files left


async def test_filesystem_ignores_foreign_files(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    await store.put("real", chunks_of(b"x"))
    (tmp_path / "stray file.txt").write_bytes(b"not an object")
    (tmp_path / ".real~0123").write_bytes(b"an interrupted upload")

    assert await all_keys(store) == {"real"}


async def test_filesystem_keys_come_in_string_order(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    names = ["a/b", "a-c", "a.c", "a0", "ab", "a/a", "b/z/z", "b/z-"]
    for key in names:
        await store.put(key, chunks_of(b"x"))

    assert [key async for key in store.keys("")] == sorted(names)


async def test_s3_rejects_a_wrong_secret_key(s3_endpoint: S3Endpoint) -> None:
    bucket = f"contract-{uuid.uuid4().hex[:20]}"
    right = make_s3_store(s3_endpoint, bucket)
    wrong_secret = make_s3_store(s3_endpoint, bucket, secret_key=s3_endpoint.secret_key + "x")
    wrong_access = make_s3_store(S3Endpoint(s3_endpoint.endpoint, "nobody", s3_endpoint.secret_key), bucket)
    try:
        await right.init()
        await right.put("obj", chunks_of(b"ok"))

        with pytest.raises(S3Error) as raised:
            await wrong_secret.read_range("obj", 0, 2)
        assert raised.value.code == "SignatureDoesNotMatch"
        with pytest.raises(S3Error) as raised:
            await wrong_secret.put("obj", chunks_of(b"overwritten"))
        assert raised.value.code == "SignatureDoesNotMatch"
        with pytest.raises(S3Error):  # a HEAD request: the error has no body, only the 403 status
            await wrong_secret.init()
        with pytest.raises(S3Error) as raised:
            await wrong_access.read_range("obj", 0, 2)
        assert raised.value.code == "InvalidAccessKeyId"

        assert await right.read_range("obj", 0, 100) == b"ok"
    finally:
        for store in (right, wrong_secret, wrong_access):
            await store.close()
