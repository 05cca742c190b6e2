"""Cluster object store: any S3 API (Ceph RGW, JuiceFS gateway, AWS) through the ``minio`` SDK.

The SDK is synchronous; its calls run in this store's own thread pools so that a long upload can never
starve the event loop's default executor (which the chunk producer of that upload may need).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import itertools
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from services.storage.adapters import check_key, check_range
from services.storage.ports import ObjectNotFoundError

READ_CHUNK = 256 * 1024
MIN_PART_SIZE = 5 << 20  # the S3 minimum for every part but the last
MAX_PART_SIZE = 5 << 30
LIST_BATCH = 1000
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})

T = TypeVar("T")


class _ChunkReader:
    """A blocking ``read()`` over an async chunk iterator, for the SDK's upload thread.

    Each chunk is pulled on the event loop with ``run_coroutine_threadsafe``; at most one ``read(n)``
    worth of bytes is buffered, so an upload holds about one part in memory.
    """

    def __init__(self, chunks: AsyncIterable[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = aiter(chunks)
        self._loop = loop
        self._buffer = bytearray()
        self._eof = False
        self._lock = threading.Lock()
        self._cancelled = False
        self._pending: concurrent.futures.Future[bytes | None] | None = None
        self.size = 0

    async def _next_chunk(self) -> bytes | None:
        return await anext(self._chunks, None)

    def _pull(self) -> bytes | None:
        with self._lock:
            if self._cancelled:
                raise concurrent.futures.CancelledError("the upload was cancelled")
            pending = asyncio.run_coroutine_threadsafe(self._next_chunk(), self._loop)
            self._pending = pending
        try:
            return pending.result()
        finally:
            with self._lock:
                self._pending = None

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and not self._eof:
            chunk = self._pull()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
                self.size += len(chunk)
        count = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        with memoryview(self._buffer) as view:
            data = view[:count].tobytes()
        del self._buffer[:count]
        return data

    def cancel(self) -> None:
        """Make the upload thread fail at its next read (the awaiting task was cancelled)."""
        with self._lock:
            self._cancelled = True
            if self._pending is not None:
                self._pending.cancel()


class _ResponseStream(AsyncIterator[bytes]):
    """Streams an S3 GET response in chunks, returning its connection to the pool at the end."""

    def __init__(self, response: Any, chunk_size: int, run: Callable[..., Any]) -> None:
        self._response: Any = response
        self._chunk_size = chunk_size
        self._run = run
        self._lock = threading.Lock()

    def _read(self) -> bytes:
        with self._lock:
            if self._response is None:
                return b""
            data: bytes = self._response.read(self._chunk_size)
            if not data:  # fully read: the connection can be reused
                self._response.release_conn()
                self._response = None
            return data

    def _close(self) -> None:
        with self._lock:
            if self._response is not None:
                self._response.close()  # not fully read: drop the connection
                self._response.release_conn()
                self._response = None

    async def __anext__(self) -> bytes:
        data: bytes = await self._run(self._read)
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        """Stop reading before the end and release the connection."""
        await self._run(self._close)

    def __del__(self) -> None:
        self._close()


class _EmptyStream(AsyncIterator[bytes]):
    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


def _take(iterator: Iterator[T], count: int) -> list[T]:
    return list(itertools.islice(iterator, count))


class S3ObjectStore:
    """Object store on one bucket of an S3 API; ``init()`` creates the bucket when missing.

    Uploads stream: the object is sent in parts of ``part_size`` bytes (multipart upload above one
    part), so memory stays near one part whatever the object size. An upload whose chunk stream fails
    is aborted, so the previous object (or none) stays visible.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = True,
        region: str | None = None,
        part_size: int = 8 << 20,
        chunk_size: int = READ_CHUNK,
        max_uploads: int = 8,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes")
        self._bucket = bucket
        self._part_size = part_size
        self._chunk_size = chunk_size
        tls: dict[str, Any] = (
            {"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("SSL_CERT_FILE") or certifi.where()}
            if secure
            else {}
        )
        self._http = urllib3.PoolManager(
            maxsize=16,
            timeout=urllib3.Timeout(connect=10.0, read=120.0),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=(502, 503, 504), raise_on_status=False
            ),
            **tls,
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="s3-io")
        self._uploads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_uploads, thread_name_prefix="s3-upload"
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._io, functools.partial(ctx.run, fn, *args))

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (blocking)."""
        if self._client.bucket_exists(self._bucket):
            return
        try:
            self._client.make_bucket(self._bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def init(self) -> None:
        """Create the bucket when missing."""
        await self._call(self.ensure_bucket)

    def _put(self, key: str, reader: _ChunkReader) -> None:
        self._client.put_object(
            self._bucket,
            key,
            cast(BinaryIO, reader),  # the SDK only calls read(n)
            length=-1,
            part_size=self._part_size,
            num_parallel_uploads=1,  # one part in flight: memory stays near part_size
        )

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Upload the object from a stream of chunks; return its size in bytes."""
        check_key(key)
        loop = asyncio.get_running_loop()
        reader = _ChunkReader(chunks, loop)
        ctx = contextvars.copy_context()
        upload = loop.run_in_executor(self._uploads, functools.partial(ctx.run, self._put, key, reader))
        try:
            await upload
        except asyncio.CancelledError:
            reader.cancel()
            raise
        return reader.size

    def _stat_size(self, key: str) -> int | None:
        try:
            size = self._client.stat_object(self._bucket, key).size
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise
        return size or 0

    def _get(self, key: str, start: int, end: int | None) -> Any:
        """The GET response for ``[start, end)``, or None when the range starts at/after the end."""
        try:
            return self._client.get_object(
                self._bucket, key, offset=start, length=0 if end is None else end - start
            )
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectNotFoundError(key) from exc
            if exc.code == "InvalidRange":
                if self._stat_size(key) is None:
                    raise ObjectNotFoundError(key) from exc
                return None
            raise

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` of the object; ObjectNotFoundError when it does not exist."""
        check_key(key)
        check_range(start, end)
        if end == start:
            if await self._call(self._stat_size, key) is None:
                raise ObjectNotFoundError(key)
            return _EmptyStream()
        response = await self._call(self._get, key, start, end)
        if response is None:
            return _EmptyStream()
        return _ResponseStream(response, self._chunk_size, self._call)

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        if end == start:
            if self._stat_size(key) is None:
                raise ObjectNotFoundError(key)
            return b""
        response = self._get(key, start, end)
        if response is None:
            return b""
        try:
            data: bytes = response.read()
        finally:
            response.close()
            response.release_conn()
        return data

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of the object (shorter only at the end of the object)."""
        check_key(key)
        check_range(start, end)
        return await self._call(self._read_range, key, start, end)

    async def size(self, key: str) -> int | None:
        """Return the object's size, or None when it does not exist."""
        check_key(key)
        return await self._call(self._stat_size, key)

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        check_key(key)
        await self._call(self._client.remove_object, self._bucket, key)

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Iterate over the keys that start with ``prefix``, in string order."""
        listing = self._client.list_objects(self._bucket, prefix=prefix or None, recursive=True)
        while True:
            batch = await self._call(_take, listing, LIST_BATCH)
            for item in batch:
                name: str = item.object_name
                if not name.endswith("/"):
                    yield name
            if len(batch) < LIST_BATCH:
                return

    def _ping(self) -> None:
        if not self._client.bucket_exists(self._bucket):
            raise RuntimeError(f"S3 bucket {self._bucket!r} does not exist")

    async def ping(self) -> None:
        """Raise when the S3 endpoint cannot be reached or the bucket is missing."""
        await self._call(self._ping)

    async def close(self) -> None:
        """Stop the worker threads and close pooled connections."""
        self._uploads.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._io.shutdown, wait=True)
        self._http.clear()
