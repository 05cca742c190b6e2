"""Unit tests for the segmented envelope encryption format (pacslib.envelope)."""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pacslib import envelope
from pacslib.envelope import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    TAG_SIZE,
    Encryptor,
    IntegrityError,
    RangeReader,
    ciphertext_size,
    decrypt_bytes,
    encrypt_bytes,
    encrypt_stream,
    new_data_key,
    plaintext_size,
)

SEG = 1024  # small segments keep multi-segment cases fast; the default size is covered separately
OID = "1.2.826.0.1.3680043.8.498.1/instance"


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random plaintext."""
    return random.Random(seed).randbytes(size)


def encrypt(dek: bytes, data: bytes, segment_size: int = SEG, object_id: str = OID) -> bytes:
    return encrypt_bytes(dek, object_id, data, segment_size=segment_size)


def segment_span(index: int, segment_size: int = SEG) -> tuple[int, int]:
    """Stored byte range of a full (non-last) segment."""
    start = HEADER_SIZE + index * (segment_size + TAG_SIZE)
    return start, start + segment_size + TAG_SIZE


class Store:
    """An in-memory object store read by range that records the ranges asked for."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.calls: list[tuple[int, int]] = []

    async def read_range(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        return self.blob[start:end]

    def reader(
        self,
        dek: bytes,
        object_id: str = OID,
        size: int | None = None,
        read_range: Callable[[int, int], Awaitable[bytes]] | None = None,
    ) -> RangeReader:
        return RangeReader(
            dek, object_id, len(self.blob) if size is None else size, read_range or self.read_range
        )

    @property
    def bytes_read(self) -> int:
        return sum(end - start for start, end in self.calls)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def agen(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into chunks cycling through ``sizes``."""
    parts, pos, i = [], 0, 0
    while pos < len(data):
        parts.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return parts


@pytest.fixture
def dek() -> bytes:
    return new_data_key()


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 2 * SEG + 1, 7 * SEG - 3, 3 * 1024 * 1024 + 7]
)
def test_round_trip_sizes(dek: bytes, size: int) -> None:
    data = payload(size, seed=size)
    blob = encrypt(dek, data)
    assert len(blob) == ciphertext_size(size, SEG)
    assert plaintext_size(len(blob), blob[:HEADER_SIZE]) == size
    assert decrypt_bytes(dek, OID, blob) == data


@pytest.mark.parametrize(
    "size",
    [0, 1, DEFAULT_SEGMENT_SIZE - 1, DEFAULT_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE + 1, 5 * 1024 * 1024 + 3],
)
def test_round_trip_default_segment_size(dek: bytes, size: int) -> None:
    data = payload(size, seed=size)
    blob = encrypt_bytes(dek, OID, data)
    header = envelope.parse_header(blob)
    assert header.segment_size == DEFAULT_SEGMENT_SIZE
    assert plaintext_size(len(blob)) == size
    assert decrypt_bytes(dek, OID, blob) == data


def test_layout_exact_multiple_has_empty_last_segment(dek: bytes) -> None:
    blob = encrypt(dek, payload(2 * SEG))
    # Two full segments plus an empty, flagged-last one.
    assert len(blob) == HEADER_SIZE + 2 * (SEG + TAG_SIZE) + TAG_SIZE


def test_header_layout(dek: bytes) -> None:
    enc = Encryptor(dek, OID, segment_size=4096)
    header = enc.header()
    assert len(header) == HEADER_SIZE == 16
    assert header[:4] == b"CPE1"
    assert header[4] == 1
    assert struct.unpack(">I", header[5:9])[0] == 4096
    other = Encryptor(dek, OID, segment_size=4096).header()
    assert header[9:] != other[9:], "nonce prefix must be random per object"


def test_segment_nonce_and_aad_match_documented_construction(dek: bytes) -> None:
    """Decrypt a stored object with plain AES-GCM, following docs/envelope.md, without the library."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = payload(SEG + 10)
    blob = encrypt(dek, data)
    header, prefix = blob[:16], blob[9:16]
    aad = header + OID.encode()
    seg0 = blob[16 : 16 + SEG + 16]
    seg1 = blob[16 + SEG + 16 :]
    aead = AESGCM(dek)
    assert aead.decrypt(prefix + struct.pack(">IB", 0, 0), seg0, aad) == data[:SEG]
    assert aead.decrypt(prefix + struct.pack(">IB", 1, 1), seg1, aad) == data[SEG:]


@pytest.mark.parametrize("chunk_sizes", [[1], [7, 3, 1000], [SEG - 1], [SEG], [SEG + 1], [5 * SEG + 13, 2]])
async def test_encrypt_stream_odd_chunks(dek: bytes, chunk_sizes: list[int]) -> None:
    data = payload(9 * SEG + 123, seed=len(chunk_sizes))
    blob = await collect(encrypt_stream(dek, OID, agen(split(data, chunk_sizes)), segment_size=SEG))
    assert len(blob) == ciphertext_size(len(data), SEG)
    assert decrypt_bytes(dek, OID, blob) == data


async def test_encrypt_stream_empty_input(dek: bytes) -> None:
    blob = await collect(encrypt_stream(dek, OID, agen([]), segment_size=SEG))
    assert len(blob) == HEADER_SIZE + TAG_SIZE
    assert decrypt_bytes(dek, OID, blob) == b""


async def test_encrypt_stream_bounds_output_pieces(dek: bytes) -> None:
    data = payload(5 * 1024 * 1024)
    pieces = [p async for p in encrypt_stream(dek, OID, agen([data]), segment_size=SEG)]
    assert max(len(p) for p in pieces) <= (1 << 20) + (1 << 20) // SEG * TAG_SIZE
    assert decrypt_bytes(dek, OID, b"".join(pieces)) == data


def test_encryptor_update_returns_only_complete_segments(dek: bytes) -> None:
    enc = Encryptor(dek, OID, segment_size=SEG)
    parts = [enc.header()]
    assert enc.update(b"x" * (SEG - 1)) == b""
    out = enc.update(b"y" * 2)
    assert len(out) == SEG + TAG_SIZE
    parts.append(out)
    parts.append(enc.finalize())
    assert len(parts[-1]) == 1 + TAG_SIZE
    assert decrypt_bytes(dek, OID, b"".join(parts)) == b"x" * (SEG - 1) + b"yy"


def test_encryptor_misuse(dek: bytes) -> None:
    enc = Encryptor(dek, OID, segment_size=SEG)
    with pytest.raises(RuntimeError, match="header"):
        enc.update(b"abc")
    enc.header()
    enc.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        enc.update(b"abc")
    with pytest.raises(RuntimeError, match="finalized"):
        enc.finalize()


@pytest.mark.parametrize("segment_size", [0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1])
def test_segment_size_bounds_on_write(dek: bytes, segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment size"):
        Encryptor(dek, OID, segment_size=segment_size)


def test_bad_key_and_object_id() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Encryptor(b"short", OID)
    with pytest.raises(ValueError, match="object id"):
        Encryptor(new_data_key(), "")


def test_plaintext_does_not_appear_in_ciphertext(dek: bytes) -> None:
    name = b"DOE^JOHN"
    data = (b"\x10\x00\x10\x00PN\x08\x00" + name) * 500  # crosses many segment boundaries
    blob = encrypt(dek, data)
    assert name not in blob
    assert name not in encrypt_bytes(dek, OID, name)
    assert decrypt_bytes(dek, OID, blob) == data


# --- ranges ------------------------------------------------------------------------------------------


async def test_random_ranges_match_slicing(dek: bytes) -> None:
    rng = random.Random(1234)
    for size in [0, 1, SEG - 1, SEG, SEG + 1, 10 * SEG, 37 * SEG + 555]:
        data = payload(size, seed=size)
        store = Store(encrypt(dek, data))
        reader = store.reader(dek)
        assert await reader.plaintext_size() == size
        for _ in range(60):
            start = rng.randint(0, size)
            end = rng.randint(start, size)
            assert await reader.read(start, end) == data[start:end], (size, start, end)


async def test_range_reads_only_covering_segments(dek: bytes) -> None:
    data = payload(50 * SEG + 17)
    store = Store(encrypt(dek, data))
    reader = store.reader(dek)
    start, end = 10 * SEG + 5, 12 * SEG + 1  # touches segments 10, 11 and 12
    assert await reader.read(start, end) == data[start:end]
    assert store.calls == [(0, HEADER_SIZE), (segment_span(10)[0], segment_span(12)[1])]
    store.calls.clear()
    assert await reader.read(3 * SEG, 4 * SEG) == data[3 * SEG : 4 * SEG]
    assert store.calls == [segment_span(3)], "header is cached; an aligned range reads one segment"


async def test_range_reaching_last_segment(dek: bytes) -> None:
    data = payload(5 * SEG + 100)
    store = Store(encrypt(dek, data))
    reader = store.reader(dek)
    assert await reader.read(5 * SEG + 50, len(data)) == data[5 * SEG + 50 :]
    assert await reader.read(len(data), len(data)) == b""


async def test_range_arguments_validated(dek: bytes) -> None:
    data = payload(3 * SEG)
    reader = Store(encrypt(dek, data)).reader(dek)
    with pytest.raises(ValueError, match="invalid plaintext range"):
        await reader.read(5, 4)
    with pytest.raises(ValueError, match="invalid plaintext range"):
        await reader.read(-1, 4)
    with pytest.raises(ValueError, match="beyond"):
        await reader.read(0, len(data) + 1)


@pytest.mark.parametrize("max_chunk", [1, 100, SEG, 3 * SEG + 7, 1 << 20])
async def test_stream_matches_slices_and_bounds_reads(dek: bytes, max_chunk: int) -> None:
    data = payload(20 * SEG + 321, seed=max_chunk)
    store = Store(encrypt(dek, data))
    reader = store.reader(dek)
    rng = random.Random(max_chunk)
    for start, end in [(0, None), (1, SEG), (SEG - 1, 7 * SEG + 2), (rng.randint(0, len(data)), len(data))]:
        store.calls.clear()
        chunks = [c async for c in reader.stream(start, end, max_chunk=max_chunk)]
        assert b"".join(chunks) == data[start:end]
        assert all(0 < len(c) <= max_chunk for c in chunks)
        per_read = max(SEG, max_chunk // SEG * SEG) + (max(1, max_chunk // SEG)) * TAG_SIZE
        assert all(e - s <= per_read for s, e in store.calls)


async def test_stream_empty_object_and_empty_range(dek: bytes) -> None:
    reader = Store(encrypt(dek, b"")).reader(dek)
    assert [c async for c in reader.stream()] == []
    reader = Store(encrypt(dek, b"abc")).reader(dek)
    assert [c async for c in reader.stream(2, 2)] == []


async def test_stream_memory_is_bounded(dek: bytes) -> None:
    """Streaming 48 MiB through encrypt and decrypt keeps peak allocations to a few MiB."""
    total, chunk = 48 * 1024 * 1024, 256 * 1024
    block = payload(chunk)
    pattern = block * 5  # any 1 MiB window of the plaintext, starting at its offset modulo the chunk
    stored = bytearray()

    async def source() -> AsyncIterator[bytes]:
        for _ in range(total // chunk):
            yield block

    tracemalloc.start()
    try:
        async for piece in encrypt_stream(dek, OID, source()):
            stored += piece
        # The stored object itself (a bytearray of ~48 MiB) is outside what we measure from here on.
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        blob = memoryview(stored)

        async def read_range(start: int, end: int) -> bytes:
            return bytes(blob[start:end])

        seen = 0
        reader = RangeReader(dek, OID, len(stored), read_range)
        async for piece in reader.stream(max_chunk=1 << 20):
            assert piece == pattern[seen % chunk : seen % chunk + len(piece)]
            seen += len(piece)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert seen == total
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while streaming"


# --- tampering ---------------------------------------------------------------------------------------


def flip(blob: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(blob)
    out[pos] ^= 1 << bit
    return bytes(out)


async def assert_rejected(
    dek: bytes, blob: bytes, object_id: str = OID, *, size_check: bool = True, size: int | None = None
) -> None:
    """Every way of reading all of ``blob`` raises IntegrityError.

    ``size_check``: the damage is in the header, the last segment or the size, so even the authenticated
    ``plaintext_size()`` (which reads only the last segment) must fail.
    """
    with pytest.raises(IntegrityError):
        decrypt_bytes(dek, object_id, blob)
    store = Store(blob)
    with pytest.raises(IntegrityError):
        await collect(store.reader(dek, object_id, size).stream())
    with pytest.raises(IntegrityError):
        await collect(store.reader(dek, object_id, size).stream(max_chunk=1))
    if size_check:
        with pytest.raises(IntegrityError):
            await store.reader(dek, object_id, size).plaintext_size()


@pytest.fixture
def sample(dek: bytes) -> tuple[bytes, bytes]:
    data = payload(4 * SEG + 300)
    return data, encrypt(dek, data)


@pytest.mark.parametrize("pos", range(HEADER_SIZE))
async def test_flipped_header_bit(dek: bytes, sample: tuple[bytes, bytes], pos: int) -> None:
    _, blob = sample
    await assert_rejected(dek, flip(blob, pos, bit=pos % 8))


@pytest.mark.parametrize("segment", range(5))
@pytest.mark.parametrize("where", ["first", "middle", "tag"])
async def test_flipped_segment_or_tag_bit(
    dek: bytes, sample: tuple[bytes, bytes], segment: int, where: str
) -> None:
    data, blob = sample
    start = HEADER_SIZE + segment * (SEG + TAG_SIZE)
    end = min(start + SEG + TAG_SIZE, len(blob))
    pos = {"first": start, "middle": (start + end - TAG_SIZE) // 2, "tag": end - 1}[where]
    tampered = flip(blob, pos, bit=3)
    await assert_rejected(dek, tampered, size_check=segment == 4)
    # A range inside the tampered segment fails too; ranges elsewhere still authenticate.
    reader = Store(tampered).reader(dek)
    lo = segment * SEG
    with pytest.raises(IntegrityError):
        await reader.read(lo, lo + 1)
    other = (segment + 1) % 5
    assert await reader.read(other * SEG, other * SEG + 10) == data[other * SEG : other * SEG + 10]


async def test_truncated_at_segment_boundary(dek: bytes) -> None:
    data = payload(4 * SEG)  # 4 full segments + empty last segment
    blob = encrypt(dek, data)
    for keep in [4, 3, 1]:
        await assert_rejected(dek, blob[: segment_span(keep - 1)[1]])
    # Dropping the empty last segment leaves a size with no valid layout.
    await assert_rejected(dek, blob[:-TAG_SIZE])


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 300, SEG + 16 + 5])
async def test_truncated_mid_segment(dek: bytes, sample: tuple[bytes, bytes], cut: int) -> None:
    _, blob = sample
    await assert_rejected(dek, blob[:-cut])


@pytest.mark.parametrize("cut", [len(b"CPE1"), HEADER_SIZE, HEADER_SIZE + TAG_SIZE - 1])
async def test_truncated_into_header(dek: bytes, sample: tuple[bytes, bytes], cut: int) -> None:
    _, blob = sample
    await assert_rejected(dek, blob[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"A" * TAG_SIZE, bytes(SEG + TAG_SIZE)])
async def test_appended_bytes(dek: bytes, sample: tuple[bytes, bytes], extra: bytes) -> None:
    _, blob = sample
    await assert_rejected(dek, blob + extra)


async def test_appended_valid_segment_from_same_object(dek: bytes) -> None:
    data = payload(3 * SEG)
    blob = encrypt(dek, data)
    await assert_rejected(dek, blob + blob[slice(*segment_span(0))])


async def test_swapped_segments(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    a, b = segment_span(1), segment_span(2)
    swapped = blob[: a[0]] + blob[b[0] : b[1]] + blob[a[0] : a[1]] + blob[b[1] :]
    assert len(swapped) == len(blob)
    await assert_rejected(dek, swapped, size_check=False)
    reader = Store(swapped).reader(dek)
    with pytest.raises(IntegrityError):
        await reader.read(SEG, SEG + 1)


async def test_segment_from_another_object_same_key(dek: bytes) -> None:
    a, b = encrypt(dek, payload(3 * SEG, 1)), encrypt(dek, payload(3 * SEG, 2))
    span = segment_span(1)
    mixed = a[: span[0]] + b[span[0] : span[1]] + a[span[1] :]
    await assert_rejected(dek, mixed, size_check=False)


async def test_other_object_id(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    await assert_rejected(dek, blob, object_id=OID + "x")
    await assert_rejected(dek, blob, object_id="1.2.3")


async def test_wrong_dek(sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    await assert_rejected(new_data_key(), blob)


async def test_wrong_ciphertext_size_given_to_reader(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    for size in [len(blob) - 1, len(blob) + 1, len(blob) - (SEG + TAG_SIZE), len(blob) + SEG + TAG_SIZE, 3]:
        store = Store(blob)
        with pytest.raises(IntegrityError):
            await store.reader(dek, size=size).plaintext_size()


async def test_short_read_from_store(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample

    async def short(start: int, end: int) -> bytes:
        return blob[start : end - 1]

    with pytest.raises(IntegrityError, match="different number of bytes"):
        await RangeReader(dek, OID, len(blob), short).read(0, 10)


async def test_truncation_reported_for_out_of_range_read(dek: bytes) -> None:
    data = payload(4 * SEG + 10)
    blob = encrypt(dek, data)
    truncated = blob[: segment_span(2)[1]]  # ends on a full segment: no valid layout has that size
    reader = Store(truncated).reader(dek)
    with pytest.raises(IntegrityError):
        await reader.read(3 * SEG, 3 * SEG + 5)
    # Cut to a valid-looking layout: the reader thinks the object ends inside segment 2.
    truncated = blob[: segment_span(2)[0] + 100 + TAG_SIZE]
    reader = Store(truncated).reader(dek)
    assert await reader.read(0, 10) == data[:10], "bytes from intact segments are still authentic"
    with pytest.raises(IntegrityError):
        await reader.read(3 * SEG, 3 * SEG + 5)


async def test_huge_segment_size_in_header_is_rejected_without_reading(dek: bytes) -> None:
    blob = bytearray(encrypt(dek, payload(2 * SEG)))
    blob[5:9] = struct.pack(">I", 0xFFFFFFFF)
    store = Store(bytes(blob))
    with pytest.raises(IntegrityError, match="segment size"):
        await store.reader(dek).read(0, 1)
    assert store.calls == [(0, HEADER_SIZE)]


async def test_other_valid_segment_size_in_header(dek: bytes) -> None:
    blob = bytearray(encrypt(dek, payload(2 * SEG)))
    blob[5:9] = struct.pack(">I", SEG // 2)
    await assert_rejected(dek, bytes(blob))


def test_bad_magic_and_version_messages(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    with pytest.raises(IntegrityError, match="bad magic") as info:
        decrypt_bytes(dek, OID, b"XXXX" + blob[4:])
    assert info.value.object_id == OID
    assert OID in str(info.value)
    with pytest.raises(IntegrityError, match="version 2"):
        decrypt_bytes(dek, OID, blob[:4] + b"\x02" + blob[5:])


def test_plaintext_size_rejects_impossible_sizes() -> None:
    with pytest.raises(IntegrityError):
        plaintext_size(HEADER_SIZE + TAG_SIZE - 1)
    with pytest.raises(IntegrityError):
        plaintext_size(HEADER_SIZE + TAG_SIZE + DEFAULT_SEGMENT_SIZE)  # "last" segment cannot be full
    assert plaintext_size(HEADER_SIZE + TAG_SIZE) == 0
    assert plaintext_size(ciphertext_size(10**9)) == 10**9


def test_integrity_error_message_names_object_only(dek: bytes, sample: tuple[bytes, bytes]) -> None:
    _, blob = sample
    with pytest.raises(IntegrityError) as info:
        decrypt_bytes(dek, "obj-42", blob)
    message = str(info.value)
    assert "obj-42" in message
    assert "integrity check" in message
    assert dek.hex() not in message
