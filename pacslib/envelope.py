"""Segmented envelope encryption of stored objects (AES-256-GCM, STREAM-style, random-access ranges).

Format (documented byte for byte in docs/envelope.md)::

    header   = b"CPE1" | version (u8 = 1) | segment_size (u32 BE) | nonce_prefix (7 random bytes)
    segment  = AES-256-GCM(dek, nonce, plaintext_i, aad) = ciphertext_i | tag (16 bytes)
    nonce    = nonce_prefix | segment index (u32 BE) | last flag (0x00 / 0x01)
    aad      = header | object_id (UTF-8)
    object   = header | segment_0 | ... | segment_n   (segment_n flagged last, plaintext 0..segment_size-1)

Every segment but the last holds exactly ``segment_size`` plaintext bytes, so the ciphertext size alone
gives the layout, and any plaintext range maps to the few segments that cover it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CPE1"
FORMAT_VERSION = 1
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
DEFAULT_SEGMENT_SIZE = 65536
# Bounds apply on write and on read: a corrupt header can never make a reader allocate more than one
# MAX_SEGMENT_SIZE buffer per segment.
MIN_SEGMENT_SIZE = 256
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
MAX_SEGMENTS = 1 << 32  # the segment index is a u32 in the nonce

_HEADER = struct.Struct(">4sBI7s")  # magic, version, segment size, nonce prefix
HEADER_SIZE = _HEADER.size
_NONCE_TAIL = struct.Struct(">IB")
# Large update() inputs are sealed and returned in pieces of about this size by encrypt_stream.
_STREAM_PIECE = 1 << 20


class IntegrityError(Exception):
    """A stored object (or wrapped key) failed its integrity check; its bytes must not be used."""

    def __init__(self, object_id: str | None, detail: str) -> None:
        what = f"stored object {object_id!r}" if object_id is not None else "stored object"
        super().__init__(f"{what} failed its integrity check: {detail}")
        self.object_id = object_id
        self.detail = detail


_AUTH_FAILED = "authentication failed (tampered, truncated, reordered, wrong object id or wrong key)"


def new_data_key() -> bytes:
    """Return a fresh random 256-bit data key (DEK)."""
    return AESGCM.generate_key(bit_length=256)


def dek_context(object_id: str) -> bytes:
    """Return the key-wrapping context for an object's DEK, so a wrapped DEK cannot move to another object."""
    return b"cloudpacs/dek/v1\x00" + _object_id_bytes(object_id)


@dataclass(frozen=True)
class Header:
    """The parsed object header."""

    version: int
    segment_size: int
    nonce_prefix: bytes

    def to_bytes(self) -> bytes:
        """Serialize the header exactly as stored at the start of the object."""
        return _HEADER.pack(MAGIC, self.version, self.segment_size, self.nonce_prefix)


@dataclass(frozen=True)
class Layout:
    """Where segments lie in an object of a given ciphertext size."""

    segment_size: int
    segment_count: int
    last_plaintext_size: int

    @property
    def plaintext_size(self) -> int:
        """Total plaintext bytes in the object."""
        return (self.segment_count - 1) * self.segment_size + self.last_plaintext_size

    @property
    def ciphertext_size(self) -> int:
        """Total stored bytes, header included."""
        return (
            HEADER_SIZE
            + (self.segment_count - 1) * (self.segment_size + TAG_SIZE)
            + (self.last_plaintext_size + TAG_SIZE)
        )

    def segment_offset(self, index: int) -> int:
        """Byte offset of segment ``index`` in the stored object."""
        return HEADER_SIZE + index * (self.segment_size + TAG_SIZE)

    def segment_end(self, index: int) -> int:
        """Byte offset just past segment ``index`` in the stored object."""
        if index == self.segment_count - 1:
            return self.ciphertext_size
        return self.segment_offset(index + 1)


def parse_header(data: bytes, object_id: str | None = None) -> Header:
    """Parse and bound-check an object header; raise IntegrityError if it cannot be one of ours."""
    if len(data) < HEADER_SIZE:
        raise IntegrityError(object_id, "object is shorter than its header")
    magic, version, segment_size, nonce_prefix = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(object_id, "not an encrypted object (bad magic)")
    if version != FORMAT_VERSION:
        raise IntegrityError(object_id, f"unsupported format version {version}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise IntegrityError(object_id, f"segment size {segment_size} is out of range")
    return Header(version=version, segment_size=segment_size, nonce_prefix=nonce_prefix)


def layout_for(ciphertext_size: int, segment_size: int, object_id: str | None = None) -> Layout:
    """Derive the segment layout from the stored size; raise IntegrityError if no valid object has it."""
    body = (
        ciphertext_size - HEADER_SIZE - TAG_SIZE
    )  # every object has at least the (possibly empty) last segment
    if body < 0:
        raise IntegrityError(object_id, f"ciphertext size {ciphertext_size} is too small")
    full_segments, last = divmod(body, segment_size + TAG_SIZE)
    # The last segment holds fewer than segment_size bytes (a full segment is never the last one), so a
    # remainder of segment_size or more means bytes were added or removed.
    if last >= segment_size:
        raise IntegrityError(
            object_id, f"ciphertext size {ciphertext_size} does not match the segment layout"
        )
    if full_segments + 1 > MAX_SEGMENTS:
        raise IntegrityError(object_id, "object has more segments than the format allows")
    return Layout(segment_size=segment_size, segment_count=full_segments + 1, last_plaintext_size=last)


def plaintext_size(ciphertext_size: int, header: bytes | None = None) -> int:
    """Return the plaintext size of an object with this stored size.

    Parameters
    ----------
    ciphertext_size:
        Size of the stored object in bytes, header included.
    header:
        The object's header; when omitted, ``DEFAULT_SEGMENT_SIZE`` is assumed.

    This is arithmetic only; it authenticates nothing (``RangeReader.plaintext_size`` does).
    """
    segment_size = DEFAULT_SEGMENT_SIZE if header is None else parse_header(header).segment_size
    return layout_for(ciphertext_size, segment_size).plaintext_size


def ciphertext_size(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Return the stored size of a plaintext of ``plaintext_size`` bytes (e.g. for a Content-Length)."""
    _check_segment_size(segment_size)
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    full_segments, last = divmod(plaintext_size, segment_size)
    return Layout(segment_size, full_segments + 1, last).ciphertext_size


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes")


def _check_dek(dek: bytes) -> None:
    if len(dek) != KEY_SIZE:
        raise ValueError(f"data key must be {KEY_SIZE} bytes")


def _object_id_bytes(object_id: str) -> bytes:
    if not object_id:
        raise ValueError("object id must not be empty")
    return object_id.encode("utf-8")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + _NONCE_TAIL.pack(index, 1 if last else 0)


class Encryptor:
    """Incremental encryptor: ``header()``, then ``update()`` any number of times, then ``finalize()``."""

    def __init__(self, dek: bytes, object_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        _check_dek(dek)
        _check_segment_size(segment_size)
        self._aead = AESGCM(dek)
        self._segment_size = segment_size
        self._header = Header(FORMAT_VERSION, segment_size, os.urandom(NONCE_PREFIX_SIZE)).to_bytes()
        self._aad = self._header + _object_id_bytes(object_id)
        self._prefix = self._header[-NONCE_PREFIX_SIZE:]
        self._buffer = bytearray()
        self._index = 0
        self._header_taken = False
        self._finished = False

    @property
    def segment_size(self) -> int:
        """Plaintext bytes per full segment."""
        return self._segment_size

    def header(self) -> bytes:
        """Return the object header; it must be written before any segment."""
        self._header_taken = True
        return self._header

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Buffer ``data`` and return the ciphertext of every segment completed so far (may be empty)."""
        self._check_writable()
        view = memoryview(data)
        size = self._segment_size
        out: list[bytes] = []
        if self._buffer:
            take = size - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < size:
                return b""
            out.append(self._seal(self._buffer, last=False))
            self._buffer.clear()
        while len(view) >= size:
            out.append(self._seal(view[:size], last=False))
            view = view[size:]
        self._buffer += view
        return b"".join(out)

    def finalize(self) -> bytes:
        """Seal the buffered remainder (possibly empty) as the last segment and return it."""
        self._check_writable()
        segment = self._seal(self._buffer, last=True)
        self._buffer.clear()
        self._finished = True
        return segment

    def _check_writable(self) -> None:
        if not self._header_taken:
            raise RuntimeError("Encryptor.header() must be called (and written) before any segment")
        if self._finished:
            raise RuntimeError("Encryptor is already finalized")

    def _seal(self, plaintext: bytes | bytearray | memoryview, *, last: bool) -> bytes:
        # A non-last segment must leave room for the last one in the u32 index space.
        if self._index >= MAX_SEGMENTS - (0 if last else 1):
            raise ValueError("object is too large for this segment size; use a larger segment size")
        segment = self._aead.encrypt(_nonce(self._prefix, self._index, last), plaintext, self._aad)
        self._index += 1
        return segment


async def encrypt_stream(
    dek: bytes,
    object_id: str,
    chunks: AsyncIterable[bytes],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Encrypt an async stream of plaintext chunks, yielding the header and then ciphertext pieces.

    Output pieces are about 1 MiB at most (one segment at least), whatever the input chunk sizes.
    """
    encryptor = Encryptor(dek, object_id, segment_size)
    yield encryptor.header()
    piece = max(_STREAM_PIECE, segment_size)
    async for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), piece):
            out = encryptor.update(view[start : start + piece])
            if out:
                yield out
    yield encryptor.finalize()


def encrypt_bytes(dek: bytes, object_id: str, data: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE) -> bytes:
    """Encrypt a small in-memory blob (e.g. a metadata document) into the same object format."""
    encryptor = Encryptor(dek, object_id, segment_size)
    return encryptor.header() + encryptor.update(data) + encryptor.finalize()


class _Decryptor:
    """Authenticated decryption of single segments of one object."""

    def __init__(self, dek: bytes, object_id: str, header_bytes: bytes, ciphertext_size: int) -> None:
        _check_dek(dek)
        self.object_id = object_id
        header = parse_header(header_bytes, object_id)
        self.layout = layout_for(ciphertext_size, header.segment_size, object_id)
        self._prefix = header.nonce_prefix
        self._aad = bytes(header_bytes[:HEADER_SIZE]) + _object_id_bytes(object_id)
        self._aead = AESGCM(dek)

    def open(self, index: int, segment: bytes | memoryview) -> bytes:
        """Decrypt and authenticate segment ``index``; raise IntegrityError on any mismatch."""
        last = index == self.layout.segment_count - 1
        try:
            return self._aead.decrypt(_nonce(self._prefix, index, last), segment, self._aad)
        except InvalidTag:
            raise IntegrityError(self.object_id, _AUTH_FAILED) from None


def decrypt_bytes(dek: bytes, object_id: str, blob: bytes) -> bytes:
    """Decrypt a whole in-memory object produced by ``encrypt_bytes`` (or any small object)."""
    decryptor = _Decryptor(dek, object_id, blob[:HEADER_SIZE], len(blob))
    layout = decryptor.layout
    view = memoryview(blob)
    return b"".join(
        decryptor.open(i, view[layout.segment_offset(i) : layout.segment_end(i)])
        for i in range(layout.segment_count)
    )


class RangeReader:
    """Decrypts plaintext ranges given a random-access reader of the ciphertext.

    Parameters
    ----------
    dek:
        The object's unwrapped data key.
    object_id:
        The identity the object was encrypted under.
    ciphertext_size:
        The stored object's size (from the object store); a wrong size raises IntegrityError.
    read_range:
        ``read_range(start, end)`` returns stored bytes ``[start, end)``.

    The header is read once and cached. Every returned byte comes from a segment that authenticated under
    this object id, its index and its last-segment flag.
    """

    def __init__(
        self,
        dek: bytes,
        object_id: str,
        ciphertext_size: int,
        read_range: Callable[[int, int], Awaitable[bytes]],
    ) -> None:
        _check_dek(dek)
        _object_id_bytes(object_id)
        self._dek = dek
        self._object_id = object_id
        self._ciphertext_size = ciphertext_size
        self._read_range = read_range
        self._decryptor: _Decryptor | None = None
        self._verified_size: int | None = None

    async def plaintext_size(self) -> int:
        """Return the plaintext size, authenticated by decrypting the last segment (once, cached)."""
        if self._verified_size is None:
            decryptor = await self._prepare()
            last = decryptor.layout.segment_count - 1
            await self._read_segments(decryptor, last, last + 1)
            self._verified_size = decryptor.layout.plaintext_size
        return self._verified_size

    async def read(self, start: int, end: int) -> bytes:
        """Return plaintext ``[start, end)``, reading only the segments that cover it."""
        decryptor = await self._prepare()
        segments = await self._segments_for(decryptor, start, end)
        if not segments:
            return b""
        plaintext = await self._read_segments(decryptor, segments.start, segments.stop)
        offset = segments.start * decryptor.layout.segment_size
        return plaintext[start - offset : end - offset]

    async def stream(
        self, start: int = 0, end: int | None = None, max_chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Yield plaintext ``[start, end)`` in order, reading about ``max_chunk`` bytes at a time."""
        if max_chunk <= 0:
            raise ValueError("max_chunk must be positive")
        decryptor = await self._prepare()
        layout = decryptor.layout
        if end is None:
            end = layout.plaintext_size
        segments = await self._segments_for(decryptor, start, end)
        per_read = max(1, max_chunk // layout.segment_size)
        for first in segments[::per_read]:
            stop = min(first + per_read, segments.stop)
            plaintext = await self._read_segments(decryptor, first, stop)
            offset = first * layout.segment_size
            view = memoryview(plaintext)[
                max(start, offset) - offset : min(end, offset + len(plaintext)) - offset
            ]
            for piece in range(0, len(view), max_chunk):
                yield bytes(view[piece : piece + max_chunk])

    async def _prepare(self) -> _Decryptor:
        if self._decryptor is None:
            if self._ciphertext_size < HEADER_SIZE:
                raise IntegrityError(self._object_id, f"ciphertext size {self._ciphertext_size} is too small")
            header = await self._fetch(0, HEADER_SIZE)
            self._decryptor = _Decryptor(self._dek, self._object_id, header, self._ciphertext_size)
        return self._decryptor

    async def _segments_for(self, decryptor: _Decryptor, start: int, end: int) -> range:
        """Indices of the segments to read for plaintext ``[start, end)``."""
        layout = decryptor.layout
        if not 0 <= start <= end:
            raise ValueError(f"invalid plaintext range [{start}, {end})")
        if end > layout.plaintext_size:
            # Beyond the end is either a caller error or a truncated object: authenticate the last segment
            # so that truncation is reported as what it is.
            size = await self.plaintext_size()
            raise ValueError(f"plaintext range [{start}, {end}) is beyond the object's {size} bytes")
        if end == layout.plaintext_size:
            # A range reaching the end always includes the last segment (even an empty one), so reading to
            # the end authenticates the object's length.
            return range(start // layout.segment_size, layout.segment_count)
        if start == end:
            return range(0)
        return range(start // layout.segment_size, (end - 1) // layout.segment_size + 1)

    async def _read_segments(self, decryptor: _Decryptor, first: int, stop: int) -> bytes:
        """Fetch segments ``[first, stop)`` in one read and return their authenticated plaintext."""
        layout = decryptor.layout
        base = layout.segment_offset(first)
        data = memoryview(await self._fetch(base, layout.segment_end(stop - 1)))
        plaintext = b"".join(
            decryptor.open(i, data[layout.segment_offset(i) - base : layout.segment_end(i) - base])
            for i in range(first, stop)
        )
        if stop == layout.segment_count:
            self._verified_size = layout.plaintext_size
        return plaintext

    async def _fetch(self, start: int, end: int) -> bytes:
        data = await self._read_range(start, end)
        if len(data) != end - start:
            raise IntegrityError(
                self._object_id, "the object store returned a different number of bytes than requested"
            )
        return data
