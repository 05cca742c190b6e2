"""Embedded object store: one file per object under a root folder, written atomically."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import threading
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO

from services.storage.adapters import check_key, check_range, is_key_part
from services.storage.ports import ObjectNotFoundError

READ_CHUNK = 256 * 1024
WRITE_BATCH = 1024 * 1024  # bytes collected from the chunk stream per thread hop
# Temporary files carry a '~', which no key may contain, so they can never shadow or be listed as a key.
_TMP_MARK = "~"
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents (mode 0700), making each new entry durable."""
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if folder.is_dir():  # created by a concurrent put
                continue
            raise
        _fsync_dir(folder.parent)


class _TempFile:
    """A temporary file next to an object's final path; ``commit`` renames it into place.

    Every method runs in a worker thread and holds the lock, so ``abort`` (run after a failure or a
    cancellation) waits for a write still in progress instead of closing its descriptor under it.
    """

    def __init__(self, final: Path) -> None:
        self._lock = threading.Lock()
        self._final = final
        _make_dirs(final.parent)
        self._path = final.parent / f".{final.name}{_TMP_MARK}{secrets.token_hex(8)}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        self._committed = False

    def write(self, chunks: list[bytes]) -> None:
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("write to a temporary object file that was already closed")
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]

    def commit(self) -> None:
        with self._lock:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._path, self._final)
            self._committed = True
            _fsync_dir(self._final.parent)

    def abort(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._committed:
                self._path.unlink(missing_ok=True)


class _FileStream(AsyncIterator[bytes]):
    """Streams ``remaining`` bytes (None: up to the end) of an open file, one thread hop per chunk."""

    def __init__(self, file: BinaryIO, remaining: int | None, chunk_size: int) -> None:
        self._lock = threading.Lock()
        self._file: BinaryIO | None = file
        self._remaining = remaining
        self._chunk_size = chunk_size

    def _read(self, size: int) -> bytes:
        with self._lock:
            return self._file.read(size) if self._file is not None else b""

    def _close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    async def __anext__(self) -> bytes:
        size = self._chunk_size if self._remaining is None else min(self._chunk_size, self._remaining)
        data = await asyncio.to_thread(self._read, size) if size > 0 and self._file is not None else b""
        if not data:
            self._close()
            raise StopAsyncIteration
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    async def aclose(self) -> None:
        """Close the file before the end of the stream."""
        self._close()

    def __del__(self) -> None:
        self._close()


class FilesystemObjectStore:
    """Object store on a local folder: the key is the file's relative path.

    Writes go to a temporary file in the same folder, are fsynced and renamed into place, so a reader
    sees the old object or the new one, never a part. Files are 0600 and folders 0700. One key cannot
    be a folder of another (``a/b`` and ``a/b/c`` cannot both exist), as with file-backed S3 gateways.
    """

    def __init__(self, root: Path, chunk_size: int = READ_CHUNK) -> None:
        self._root = root
        self._chunk_size = chunk_size
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Write the object from a stream of chunks, atomically; return its size in bytes."""
        final = self._path(key)
        try:
            tmp = await asyncio.to_thread(_TempFile, final)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValueError(f"object key {key!r} is inside the path of an existing object") from exc
        size = 0
        try:
            batch: list[bytes] = []
            batch_size = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                batch.append(chunk)
                batch_size += len(chunk)
                if batch_size >= WRITE_BATCH:
                    await asyncio.to_thread(tmp.write, batch)
                    size += batch_size
                    batch, batch_size = [], 0
            if batch:
                await asyncio.to_thread(tmp.write, batch)
                size += batch_size
            await asyncio.to_thread(tmp.commit)
        except IsADirectoryError as exc:
            await asyncio.to_thread(tmp.abort)
            raise ValueError(f"object key {key!r} is a folder holding other objects") from exc
        except BaseException:
            await asyncio.to_thread(tmp.abort)
            raise
        return size

    def _open(self, key: str, path: Path, start: int) -> BinaryIO:
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(key) from exc
        file = os.fdopen(fd, "rb")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ObjectNotFoundError(key)
            file.seek(start)
        except BaseException:
            file.close()
            raise
        return file

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` of the object; ObjectNotFoundError when it does not exist."""
        check_range(start, end)
        file = await asyncio.to_thread(self._open, key, self._path(key), start)
        return _FileStream(file, None if end is None else end - start, self._chunk_size)

    def _read_range(self, key: str, path: Path, start: int, end: int) -> bytes:
        with self._open(key, path, start) as file:
            return file.read(end - start)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of the object (shorter only at the end of the object)."""
        check_range(start, end)
        return await asyncio.to_thread(self._read_range, key, self._path(key), start, end)

    @staticmethod
    def _size(path: Path) -> int | None:
        try:
            info = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    async def size(self, key: str) -> int | None:
        """Return the object's size, or None when it does not exist."""
        return await asyncio.to_thread(self._size, self._path(key))

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        _fsync_dir(path.parent)

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        await asyncio.to_thread(self._delete, self._path(key))

    def _list_dir(self, rel: str) -> list[tuple[str, bool]]:
        """``(key or folder, is_folder)`` entries of a folder in key order; temporary and foreign files skipped."""
        try:
            with os.scandir(self._root / rel if rel else self._root) as entries:
                found = [
                    (f"{rel}{entry.name}", entry.is_dir(follow_symlinks=False))
                    for entry in entries
                    if is_key_part(entry.name)
                    and (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False))
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        # Sorting folders as "name/" makes the walk yield keys in plain string order.
        return sorted(found, key=lambda item: item[0] + "/" if item[1] else item[0])

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Iterate over the keys that start with ``prefix``, in string order."""
        stack: list[tuple[str, bool]] = [("", True)]
        while stack:
            name, is_dir = stack.pop()
            if not is_dir:
                yield name
                continue
            folder = f"{name}/" if name else ""
            entries = await asyncio.to_thread(self._list_dir, folder)
            for entry, entry_is_dir in reversed(entries):
                if entry_is_dir:
                    wanted = f"{entry}/".startswith(prefix) or prefix.startswith(f"{entry}/")
                else:
                    wanted = entry.startswith(prefix)
                if wanted:
                    stack.append((entry, entry_is_dir))

    def _ping(self) -> None:
        if not self._root.is_dir() or not os.access(self._root, os.R_OK | os.W_OK | os.X_OK):
            raise OSError(f"object store folder {self._root} is missing or not writable")

    async def ping(self) -> None:
        """Raise when the root folder is missing or not writable."""
        await asyncio.to_thread(self._ping)

    async def close(self) -> None:
        """Nothing to release: files are opened per call."""
