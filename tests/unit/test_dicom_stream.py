"""Tests for the streaming DICOM Part-10 parser used by STOW-RS ingest."""

from __future__ import annotations

import base64
import logging
import random
import re
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from services.ingest.dicom_stream import DicomParseError, InstanceStreamParser, ParsedInstance

PIXEL_KEYS = {"7FE00008", "7FE00009", "7FE00010"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SMALL_FILE = 50_000  # files up to this size are also fed one byte at a time


# ---------------------------------------------------------------------------- helpers


def bundled(name: str) -> bytes:
    """Return the bytes of one of pydicom's bundled test files."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not bundled with pydicom"
    return Path(path).read_bytes()


def chunks(raw: bytes, size: int | None) -> Iterator[bytes]:
    """Split `raw` into chunks of `size` bytes (None: one chunk)."""
    if size is None:
        yield raw
        return
    for i in range(0, len(raw), size):
        yield raw[i : i + size]


def parse(raw: bytes, chunk: int | None = 4096, **limits: int) -> ParsedInstance:
    """Feed `raw` in chunks and finish."""
    parser = InstanceStreamParser(**limits)
    for piece in chunks(raw, chunk):
        parser.feed(piece)
    return parser.finish()


def read(raw: bytes) -> Dataset:
    """Read a complete instance with pydicom, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(BytesIO(raw))


BULK = "<bulk data>"  # stands for a checked bulk data marker when documents are compared
MARKER = re.compile(r"pacs-bulk:([0-9A-F]{8}(?:/\d+/[0-9A-F]{8})*);(?:(\d+);(\d+)|(frames))")


def _reference_element(element: dict[str, Any], threshold: int, addressable: bool) -> dict[str, Any] | None:
    """Turn the handler's notes into what ingest should produce: bulk markers or inline values."""
    note = element.get("BulkDataURI")
    if isinstance(note, str):
        size, _, inline = note.partition(":")
        if int(size) <= threshold:
            return {"vr": element["vr"], "InlineBinary": inline}
        return {"vr": element["vr"], "BulkDataURI": BULK} if addressable else None
    if element.get("vr") == "SQ" and "Value" in element:
        items = []
        for item in element["Value"]:
            kept = {
                k: r
                for k, v in item.items()
                if (r := _reference_element(v, threshold, addressable)) is not None
            }
            items.append(kept)
        return {**element, "Value": items}
    return element


def expected_metadata(raw: bytes, threshold: int = 1024, *, pixel_frames: bool = True) -> dict[str, Any]:
    """pydicom's own DICOM JSON of the whole instance minus file meta, bulk values as ``BULK`` markers.

    Values of a deflated data set cannot be addressed: they are left out. Encapsulated Pixel Data has
    a marker only when its frames are indexed (``pixel_frames``).
    """
    ds = read(raw)
    addressable = ds.file_meta.TransferSyntaxUID not in (DeflatedExplicitVRLittleEndian,)

    def note(element: DataElement) -> str:
        return f"{len(element.value)}:{base64.b64encode(element.value).decode()}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        document = ds.to_json_dict(0, note)
    out = {}
    for key, element in document.items():
        if key.startswith("0002"):
            continue
        if key in PIXEL_KEYS:
            encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
            if addressable and (pixel_frames or not encapsulated):
                out[key] = {"vr": "OB" if encapsulated else element["vr"], "BulkDataURI": BULK}
            continue
        kept = _reference_element(element, threshold, addressable)
        if kept is not None:
            out[key] = kept
    return out


def _value_at(ds: Dataset, path: list[str]) -> bytes:
    """pydicom's value of the element at an element path (tags and item indexes, alternating)."""
    current: Any = ds
    for i, step in enumerate(path):
        current = current[int(step, 16)].value if i % 2 == 0 else current[int(step)]
    assert isinstance(current, bytes)
    return current


def checked_markers(raw: bytes, result: ParsedInstance) -> dict[str, Any]:
    """Check every bulk data marker of the metadata against pydicom, and return it with ``BULK`` markers."""
    ds = read(raw)

    def check(element: dict[str, Any], path: list[str]) -> dict[str, Any]:
        uri = element.get("BulkDataURI")
        if uri is not None:
            match = MARKER.fullmatch(uri)
            assert match is not None, uri
            assert match.group(1).split("/") == path
            if match.group(4):  # encapsulated Pixel Data: served from the frame index
                assert path == ["7FE00010"]
                assert result.frames is not None
            else:
                offset, length = int(match.group(2)), int(match.group(3))
                assert raw[offset : offset + length] == _value_at(ds, path)
            return {**element, "BulkDataURI": BULK}
        if element.get("vr") == "SQ" and "Value" in element:
            items = [
                {k: check(v, [*path, str(index), k]) for k, v in item.items()}
                for index, item in enumerate(element["Value"])
            ]
            return {**element, "Value": items}
        return element

    return {key: check(element, [key]) for key, element in result.metadata.items()}


def expected_frames(raw: bytes) -> list[bytes]:
    """Frames as pydicom gives them: generate_frames for encapsulated, native slicing otherwise."""
    ds = read(raw)
    number_of_frames = int(ds.get("NumberOfFrames") or 1)
    pixel_data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(pixel_data, number_of_frames=number_of_frames))
    frame_length = get_expected_length(ds, unit="bytes") // number_of_frames
    return [pixel_data[k * frame_length : (k + 1) * frame_length] for k in range(number_of_frames)]


def frame_bytes(raw: bytes, frames: list[list[tuple[int, int]]]) -> list[bytes]:
    """Concatenate each frame's byte ranges from the stream as fed."""
    return [b"".join(raw[offset : offset + length] for offset, length in frame) for frame in frames]


def meta_end(raw: bytes) -> int:
    """Offset where the data set starts (after the group 0002 elements)."""
    pos = 132
    while struct.unpack_from("<H", raw, pos)[0] == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            pos += 12 + struct.unpack_from("<L", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return pos


def ui_element(tag: int, value: str, *, implicit: bool) -> bytes:
    """Encode a little endian UI element."""
    data = value.encode("ascii")
    data += b"\x00" * (len(data) % 2)
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(data)) + data
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(data)) + data


def with_identity(raw: bytes) -> bytes:
    """Insert the four identifying UIDs at the start of a test file's data set (bytes otherwise kept)."""
    ds = read(raw)
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    instance = str(ds.file_meta.get("MediaStorageSOPInstanceUID") or "1.2.3.4.1")
    start = meta_end(raw)
    identity = b"".join(
        ui_element(tag, uid, implicit=implicit)
        for tag, uid in (
            (0x00080016, SECONDARY_CAPTURE),
            (0x00080018, instance),
            (0x0020000D, "1.2.3.4.2"),
            (0x0020000E, "1.2.3.4.3"),
        )
    )
    return raw[:start] + identity + raw[start:]


def with_matching_media_uid(raw: bytes) -> bytes:
    """Make the file meta Media Storage SOP Instance UID equal the SOP Instance UID (same length)."""
    ds = read(raw)
    media = str(ds.file_meta.MediaStorageSOPInstanceUID).encode()
    instance = str(ds.SOPInstanceUID).encode()
    assert len(media) == len(instance)
    start = meta_end(raw)
    return raw[:start].replace(media, instance, 1) + raw[start:]


def identity_dataset(transfer_syntax: str = ExplicitVRLittleEndian, **attributes: Any) -> Dataset:
    """A minimal valid instance data set with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.99.1")
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.3"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some tests set invalid values on purpose
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    """Write a data set as a Part-10 file."""
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def image_dataset(
    rows: int, columns: int, frames: int, transfer_syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    """An 8-bit monochrome multi-frame image data set without pixel data."""
    return identity_dataset(
        transfer_syntax,
        Rows=rows,
        Columns=columns,
        NumberOfFrames=frames,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
    )


def explicit(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    """Encode an explicit VR little endian element (long-length form for OB/OW/SQ/UN/UT)."""
    group, element = tag >> 16, tag & 0xFFFF
    length = 0xFFFFFFFF if undefined else len(value)
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return struct.pack("<HH2sHL", group, element, vr, 0, length) + value
    return struct.pack("<HH2sH", group, element, vr, length) + value


def item(tag: int, length: int) -> bytes:
    """Encode an item, item delimiter or sequence delimiter header."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length)


ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def encapsulated_pixel_data(items: bytes) -> bytes:
    """Top-level encapsulated Pixel Data from itemised BOT + fragments."""
    return explicit(0x7FE00010, b"OB", items, undefined=True) + item(SEQ_END, 0)


# ---------------------------------------------------------------------------- conformance with pydicom


@dataclass(frozen=True)
class Case:
    """A bundled test file, how to make it a valid instance, and whether its frames are indexable."""

    name: str
    indexed: bool
    fix: Callable[[bytes], bytes] | None = None

    def raw(self) -> bytes:
        data = bundled(self.name)
        return self.fix(data) if self.fix else data


CASES = [
    Case("CT_small.dcm", indexed=True),
    Case("MR_small.dcm", indexed=True),
    Case("MR_small_implicit.dcm", indexed=True),
    Case("MR_small_bigendian.dcm", indexed=True),
    Case("MR_small_expb.dcm", indexed=True),
    Case("MR_small_RLE.dcm", indexed=True),
    Case("MR_small_jp2klossless.dcm", indexed=True),
    Case("JPEG2000.dcm", indexed=True),
    Case("JPEG2000-embedded-sequence-delimiter.dcm", indexed=True),
    Case("JPEG-lossy.dcm", indexed=True),
    Case("SC_rgb_rle_2frame.dcm", indexed=True),
    Case("SC_rgb_rle_16bit_2frame.dcm", indexed=True),
    Case("SC_rgb_small_odd.dcm", indexed=True),
    Case("SC_rgb_small_odd_big_endian.dcm", indexed=True),
    Case("SC_rgb_small_odd_jpeg.dcm", indexed=True),
    Case("SC_ybr_full_422_uncompressed.dcm", indexed=True),
    Case("examples_ybr_color.dcm", indexed=True),  # 30 JPEG frames
    Case("examples_overlay.dcm", indexed=True),  # an icon image (nested Pixel Data) in the header
    Case("rtdose.dcm", indexed=True, fix=with_matching_media_uid),  # 15 native frames, implicit VR
    Case("rtdose_expb.dcm", indexed=True, fix=with_matching_media_uid),
    Case("rtdose_rle.dcm", indexed=True),  # 15 RLE frames
    Case("MR_small_padded.dcm", indexed=False),  # value longer than the frames: not addressable
    Case("liver_1frame.dcm", indexed=False),  # BitsAllocated 1
    Case("image_dfl.dcm", indexed=False),  # deflated
    Case("rtplan.dcm", indexed=False, fix=with_matching_media_uid),  # no pixel data
    Case("test-SR.dcm", indexed=False),
    Case("reportsi.dcm", indexed=False),
    Case("waveform_ecg.dcm", indexed=False),
    Case("nested_priv_SQ.dcm", indexed=False, fix=with_identity),  # nested private sequences, implicit
    Case("UN_sequence.dcm", indexed=False, fix=with_identity),  # UN of undefined length holding items
]


@pytest.mark.parametrize("chunk", [1, 7, 4096, None], ids=["1", "7", "4096", "whole"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_pydicom(case: Case, chunk: int | None) -> None:
    raw = case.raw()
    if chunk == 1 and len(raw) > SMALL_FILE:
        chunk = 1009  # keep the suite fast; small files cover byte-by-byte feeding
    result = parse(raw, chunk)
    ds = read(raw)

    header = result.header
    assert header.sop_class_uid == ds.SOPClassUID
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert header.dataset.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert "PixelData" not in header.dataset
    assert result.size == len(raw)
    assert checked_markers(raw, result) == expected_metadata(raw, pixel_frames=case.indexed)

    if case.indexed:
        assert result.frames is not None
        assert frame_bytes(raw, result.frames) == expected_frames(raw)
    else:
        assert result.frames is None


def test_multi_frame_native_offsets_are_offsets_in_the_stream() -> None:
    raw = with_matching_media_uid(bundled("rtdose.dcm"))
    result = parse(raw)
    assert result.frames is not None
    assert len(result.frames) == 15
    frame_length = 10 * 10 * 4
    first = result.frames[0][0][0]
    assert raw[first - 4 : first] == struct.pack("<L", 15 * frame_length)  # just after the length field
    assert result.frames == [[(first + k * frame_length, frame_length)] for k in range(15)]


def _marker_bytes(raw: bytes, uri: str) -> bytes:
    match = MARKER.fullmatch(uri)
    assert match is not None, uri
    assert match.group(2) is not None, uri
    offset, length = int(match.group(2)), int(match.group(3))
    return raw[offset : offset + length]


def test_large_binaries_become_bulk_data_markers_at_any_depth() -> None:
    ds = identity_dataset()
    ds.add_new(0x00091010, "LO", "ACME")  # private creator
    ds.add_new(0x00091011, "OB", b"\x01" * 2000)
    ds.add_new(0x00091012, "OB", b"\x02" * 10)
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "ACME")
    inner.add_new(0x00091011, "OB", b"\x03" * 2000)
    inner.CodeValue = "121"
    ds.ContentSequence = [Dataset(), inner]
    raw = encode(ds)

    small = parse(raw, bulk_threshold=1024).metadata
    assert small["00091011"]["vr"] == "OB"
    assert small["00091011"]["BulkDataURI"].startswith("pacs-bulk:00091011;")
    assert _marker_bytes(raw, small["00091011"]["BulkDataURI"]) == b"\x01" * 2000
    assert small["00091012"] == {"vr": "OB", "InlineBinary": base64.b64encode(b"\x02" * 10).decode()}
    nested = small["0040A730"]["Value"][1]
    assert nested["00091011"]["BulkDataURI"].startswith("pacs-bulk:0040A730/1/00091011;")
    assert _marker_bytes(raw, nested["00091011"]["BulkDataURI"]) == b"\x03" * 2000
    assert nested["00080100"]["Value"] == ["121"]
    assert "7FE00010" not in small  # no pixel data, no marker

    large = parse(raw, bulk_threshold=4096).metadata
    assert base64.b64decode(large["00091011"]["InlineBinary"]) == b"\x01" * 2000
    assert "InlineBinary" in large["0040A730"]["Value"][1]["00091011"]


def test_pixel_data_markers_native_encapsulated_and_deflated() -> None:
    native = image_dataset(4, 4, 2)
    native.PixelData = bytes(range(32))
    raw = encode(native)
    pixel = parse(raw).metadata["7FE00010"]
    assert pixel["vr"] == "OB"
    assert _marker_bytes(raw, pixel["BulkDataURI"]) == bytes(range(32))

    encapsulated = image_dataset(4, 4, 2, RLELossless)
    encapsulated.PixelData = encapsulate([b"\x00" * 6, b"\x01" * 6])
    result = parse(encode(encapsulated))
    assert result.frames is not None
    assert result.metadata["7FE00010"] == {"vr": "OB", "BulkDataURI": "pacs-bulk:7FE00010;frames"}

    deflated = image_dataset(4, 4, 2, DeflatedExplicitVRLittleEndian)
    deflated.PixelData = bytes(range(32))
    deflated.add_new(0x00091010, "LO", "ACME")
    deflated.add_new(0x00091011, "OB", b"\x01" * 2000)
    metadata = parse(encode(deflated)).metadata
    assert "7FE00010" not in metadata  # positions in a deflated stream cannot be read by range
    assert "00091011" not in metadata


def test_small_elements_after_pixel_data_can_carry_bulk_markers() -> None:
    ds = image_dataset(4, 4, 1)
    trailer = explicit(0xFFFAFFFA, b"SQ", b"", undefined=True) + item(ITEM, 0xFFFFFFFF)
    trailer += explicit(0x04000120, b"OB", b"\x07" * 2048) + item(ITEM_END, 0) + item(SEQ_END, 0)
    raw = encode(ds) + explicit(0x7FE00010, b"OB", bytes(16)) + trailer
    metadata = parse(raw).metadata
    signature = metadata["FFFAFFFA"]["Value"][0]["04000120"]
    assert signature["BulkDataURI"].startswith("pacs-bulk:FFFAFFFA/0/04000120;")
    assert _marker_bytes(raw, signature["BulkDataURI"]) == b"\x07" * 2048
    assert list(metadata) == sorted(metadata)


# ---------------------------------------------------------------------------- header readiness


def test_header_is_ready_before_the_pixel_data_arrives() -> None:
    raw = bundled("CT_small.dcm")
    value_start = raw.index(b"\xe0\x7f\x10\x00OW") + 12
    parser = InstanceStreamParser()
    parser.feed(raw[: value_start - 1])
    assert not parser.header_ready
    parser.feed(raw[value_start - 1 : value_start + 100])
    assert parser.header_ready
    header = parser.header()
    ds = read(raw)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.dataset.PatientName == ds.PatientName
    parser.feed(raw[value_start + 100 :])
    assert parser.finish().header is header


def test_instance_without_pixel_data_is_ready_only_after_finish() -> None:
    raw = bundled("test-SR.dcm")
    parser = InstanceStreamParser()
    parser.feed(raw)
    assert not parser.header_ready
    with pytest.raises(RuntimeError):
        parser.header()
    result = parser.finish()
    assert parser.header_ready
    assert result.frames is None
    assert parser.header().sop_class_uid == read(raw).SOPClassUID


def test_elements_after_pixel_data_are_walked_and_small_ones_kept() -> None:
    ds = image_dataset(4, 4, 2)
    signature_item = explicit(0x04000015, b"CS", b"SHA256") + explicit(0x04000100, b"UI", b"1.2.3.4\x00")
    trailer = (
        explicit(0xFFFAFFFA, b"SQ", b"", undefined=True)
        + item(ITEM, 0xFFFFFFFF)
        + signature_item
        + item(ITEM_END, 0)
        + item(SEQ_END, 0)
        + explicit(0xFFFCFFFC, b"OB", bytes(2 << 20))  # 2 MiB of padding: walked, not kept
    )
    raw = encode(ds) + explicit(0x7FE00010, b"OB", bytes(range(32))) + trailer
    parser = InstanceStreamParser()
    for piece in chunks(raw, 65536):
        parser.feed(piece)
        assert parser.retained_bytes < 256 * 1024
    result = parser.finish()
    signatures = result.metadata["FFFAFFFA"]["Value"]
    assert signatures[0]["04000015"] == {"vr": "CS", "Value": ["SHA256"]}
    assert "FFFCFFFC" not in result.metadata
    assert frame_bytes(raw, result.frames or []) == [bytes(range(16)), bytes(range(16, 32))]


# ---------------------------------------------------------------------------- frame index


def _fragment_items(encapsulated: bytes) -> list[tuple[int, int]]:
    """(item offset relative to the first fragment item, fragment length) for each fragment."""
    pos, out = 0, []
    while pos < len(encapsulated):
        length = struct.unpack_from("<L", encapsulated, pos + 4)[0]
        out.append((pos, length))
        pos += 8 + length
    first = out[1][0]
    return [(offset - first, length) for offset, length in out[1:]]


FRAMES = [bytes([k]) * (60 + 2 * k) for k in range(1, 4)]


def test_fragments_are_grouped_into_frames_by_the_basic_offset_table() -> None:
    ds = image_dataset(1, 1, len(FRAMES), RLELossless)
    raw = encode(ds) + encapsulated_pixel_data(encapsulate(FRAMES, fragments_per_frame=2, has_bot=True))
    result = parse(raw, 5)
    assert result.frames is not None
    assert [len(frame) for frame in result.frames] == [2, 2, 2]
    assert frame_bytes(raw, result.frames) == FRAMES
    assert frame_bytes(raw, result.frames) == list(
        generate_frames(read(raw).PixelData, number_of_frames=len(FRAMES))
    )


def test_fragments_are_grouped_by_the_extended_offset_table() -> None:
    items = encapsulate(FRAMES, fragments_per_frame=2, has_bot=False)
    fragments = _fragment_items(items)
    offsets = [fragments[2 * k][0] for k in range(len(FRAMES))]
    lengths = [len(frame) for frame in FRAMES]
    ds = image_dataset(1, 1, len(FRAMES), RLELossless)
    ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
    ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)
    raw = encode(ds) + encapsulated_pixel_data(items)
    result = parse(raw)
    assert result.frames is not None
    assert frame_bytes(raw, result.frames) == FRAMES


def test_fragments_without_offsets_cannot_be_assigned_to_frames() -> None:
    ds = image_dataset(1, 1, len(FRAMES), RLELossless)
    raw = encode(ds) + encapsulated_pixel_data(encapsulate(FRAMES, fragments_per_frame=2, has_bot=False))
    assert parse(raw).frames is None


def test_offset_table_that_misses_fragment_boundaries_gives_no_index() -> None:
    items = bytearray(encapsulate(FRAMES, fragments_per_frame=2, has_bot=True))
    struct.pack_into("<L", items, 12, 3)  # second frame offset now points inside a fragment
    ds = image_dataset(1, 1, len(FRAMES), RLELossless)
    raw = encode(ds) + encapsulated_pixel_data(bytes(items))
    assert parse(raw).frames is None


def test_native_value_length_that_does_not_match_gives_no_index() -> None:
    ds = image_dataset(4, 4, 2)
    raw = encode(ds) + explicit(0x7FE00010, b"OB", bytes(34))
    assert parse(raw).frames is None


def test_200_mb_multi_frame_instance_is_indexed_in_bounded_memory() -> None:
    frames, side = 200, 1024
    frame_length = side * side  # 8-bit monochrome: 1 MiB per frame, 200 MiB in all
    head = encode(image_dataset(side, side, frames))
    head += struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, frames * frame_length)

    def fill(k: int) -> int:
        return (k * 37 + 11) % 251

    def stream() -> Iterator[bytes]:
        yield head
        for k in range(frames):  # one frame at a time, never the whole instance
            yield bytes([fill(k)]) * frame_length
        yield explicit(0xFFFCFFFC, b"OB", bytes(8))

    parser = InstanceStreamParser()
    tracemalloc.start()
    try:
        largest_retained = 0
        for piece in stream():
            parser.feed(piece)
            largest_retained = max(largest_retained, parser.retained_bytes)
        result = parser.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert largest_retained < 64 * 1024
    assert peak < 20 * 1024 * 1024
    assert result.size == len(head) + frames * frame_length + 12 + 8
    assert result.frames is not None
    assert len(result.frames) == frames

    def byte_at(offset: int) -> int:  # the stream's content, recomputed without storing it
        k, within = divmod(offset - len(head), frame_length)
        assert 0 <= k < frames
        assert 0 <= within < frame_length
        return fill(k)

    for k, frame in enumerate(result.frames):
        assert len(frame) == 1
        offset, length = frame[0]
        assert length == frame_length
        assert byte_at(offset) == byte_at(offset + length - 1) == fill(k)
        if k:
            assert offset == result.frames[k - 1][0][0] + frame_length
    assert result.frames[0][0][0] == len(head)


# ---------------------------------------------------------------------------- bad input


def parse_error(raw: bytes, chunk: int | None = 4096, **limits: int) -> str:
    """Parse and return the DicomParseError message (fails the test if none is raised)."""
    with pytest.raises(DicomParseError) as info:
        parse(raw, chunk, **limits)
    return str(info.value)


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_truncated_test_files_are_rejected(name: str) -> None:
    assert "truncated" in parse_error(bundled(name))


def test_cuts_are_reported_as_truncated() -> None:
    raw = bundled("CT_small.dcm")
    pixel_at = raw.index(b"\xe0\x7f\x10\x00OW")
    padding_at = raw.index(b"\xfc\xff\xfc\xffOB")
    assert pixel_at < padding_at
    cuts = {
        60: "not a DICOM Part 10 file",  # inside the preamble
        140: "truncated: the data ends inside the file meta",
        700: "truncated",  # inside the header
        pixel_at + 6: "truncated: the data ends inside an element header",
        pixel_at + 5000: "truncated: the data ends inside the pixel data",
        padding_at + 20: "truncated: the data ends inside element (FFFC,FFFC)",
    }
    for cut, expected in cuts.items():
        assert expected in parse_error(raw[:cut], 1000), cut


def test_truncated_deflated_data_set_is_rejected() -> None:
    raw = bundled("image_dfl.dcm")
    assert "truncated" in parse_error(raw[: len(raw) // 2])


def test_file_without_preamble_is_not_part_10() -> None:
    assert "not a DICOM Part 10 file" in parse_error(bundled("no_meta.dcm"))


def test_random_bytes_are_rejected() -> None:
    noise = random.Random(7).randbytes(10_000)
    assert "not a DICOM Part 10 file" in parse_error(noise)
    message = parse_error(bytes(128) + b"DICM" + noise)
    assert message


def test_missing_transfer_syntax_is_rejected() -> None:
    assert "Transfer Syntax UID" in parse_error(bundled("meta_missing_tsyntax.dcm"))


def test_unknown_transfer_syntax_is_rejected() -> None:
    raw = encode(identity_dataset(ExplicitVRLittleEndian))
    start = meta_end(raw)
    raw = raw[:start].replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.99999.1.2.1\x00") + raw[start:]
    assert "unknown transfer syntax" in parse_error(raw)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_absurd_length_is_rejected_as_soon_as_it_is_read(transfer_syntax: str) -> None:
    head = encode(identity_dataset(transfer_syntax))
    if transfer_syntax == ImplicitVRLittleEndian:
        element = struct.pack("<HHL", 0x0040, 0xA160, 0xFFFFFFF0)
    else:
        element = struct.pack("<HH2sHL", 0x0040, 0xA160, b"UT", 0, 0xFFFFFFF0)
    parser = InstanceStreamParser()
    with pytest.raises(DicomParseError, match="declares a length of 4294967280 bytes"):
        parser.feed(head + element + b"abcd")


def test_odd_length_where_even_is_required_is_rejected() -> None:
    raw = encode(identity_dataset()) + explicit(0x00280010, b"US", b"\x01\x00\x02")
    assert "odd length" in parse_error(raw)


def _nested(depth: int) -> bytes:
    opening = explicit(0x0040A730, b"SQ", b"", undefined=True) + item(ITEM, 0xFFFFFFFF)
    closing = item(ITEM_END, 0) + item(SEQ_END, 0)
    return opening * depth + closing * depth


def test_nesting_up_to_the_limit_is_parsed() -> None:
    raw = encode(identity_dataset()) + _nested(16)
    result = parse(raw)
    level = result.metadata
    for _ in range(15):
        level = level["0040A730"]["Value"][0]
    assert level["0040A730"]["Value"] == [{}]
    assert checked_markers(raw, result) == expected_metadata(raw)


def test_deep_nesting_is_rejected_while_feeding() -> None:
    raw = encode(identity_dataset()) + _nested(1000)
    parser = InstanceStreamParser()
    with pytest.raises(DicomParseError, match="nested more than 16 levels"):
        parser.feed(raw)
    assert "nested more than 4 levels" in parse_error(encode(identity_dataset()) + _nested(5), max_depth=4)


def test_deflate_bomb_is_stopped_at_the_inflated_limit() -> None:
    ds = image_dataset(2048, 2048, 2, DeflatedExplicitVRLittleEndian)
    ds.PixelData = bytes(2 * 2048 * 2048)  # 8 MiB of zeros deflate to a few KiB
    raw = encode(ds)
    assert len(raw) < 64 * 1024
    parser = InstanceStreamParser(max_inflated_bytes=1 << 20)
    with pytest.raises(DicomParseError, match="decompression bomb"):
        parser.feed(raw)
    assert parser.retained_bytes < 64 * 1024
    assert parse(raw).frames is None  # within the default limit it is a valid, unindexed instance


def test_header_larger_than_the_limit_is_rejected() -> None:
    big_value = explicit(0x0040A160, b"UT", b"x" * 100_000)
    assert "header size limit" in parse_error(encode(identity_dataset()) + big_value, max_header_bytes=65536)
    many_items = (item(ITEM, 0xFFFFFFFF) + item(ITEM_END, 0)) * 5000
    sequence = explicit(0x0040A730, b"SQ", b"", undefined=True) + many_items + item(SEQ_END, 0)
    message = parse_error(encode(identity_dataset()) + sequence, max_header_bytes=65536)
    assert "larger than the header size limit of 65536 bytes" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"StudyInstanceUID": "1.02.3"}, "Study Instance UID (0020,000D) is not a valid DICOM UID"),
        ({"SeriesInstanceUID": None}, "Series Instance UID (0020,000E) is missing"),
        ({"SOPClassUID": None}, "SOP Class UID (0008,0016) is missing"),
    ],
)
def test_identity_is_validated(change: dict[str, str | None], expected: str) -> None:
    ds = identity_dataset()
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(ds, keyword, value)
    message = parse_error(encode(ds))
    assert expected in message
    assert "1.02.3" not in message


def test_data_set_sop_instance_uid_wins_over_a_different_media_storage_uid() -> None:
    raw = bundled("rtdose.dcm")
    ds = read(raw)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    parser = InstanceStreamParser()
    parser.feed(raw)
    assert parser.finish().header.sop_instance_uid == str(ds.SOPInstanceUID)


def test_error_messages_and_logs_carry_no_phi(caplog: pytest.LogCaptureFixture) -> None:
    ds = identity_dataset(PatientBirthDate="19X0JANE")  # an invalid DA value that pydicom would quote
    raw = encode(ds)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = parse(raw)
    assert result.metadata["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert all("JANE" not in str(w.message) for w in seen)
    assert "JANE" not in caplog.text

    name_at = raw.index(b"Doe^Jane")
    messages = [
        parse_error(raw[: name_at + 3]),
        parse_error(raw[:name_at] + b"\xff\xff" + raw[name_at:]),
        parse_error(encode(identity_dataset(StudyInstanceUID="1.2.Jane"))),
    ]
    for message in messages:
        assert "Jane" not in message
        assert "SECRET" not in message


def test_errors_are_sticky_and_finish_is_final() -> None:
    parser = InstanceStreamParser()
    with pytest.raises(DicomParseError) as first:
        parser.feed(b"\x00" * 128 + b"NOPE")
    with pytest.raises(DicomParseError) as again:
        parser.feed(b"more")
    assert again.value is first.value
    with pytest.raises(DicomParseError):
        parser.finish()

    done = InstanceStreamParser()
    done.feed(bundled("MR_small.dcm"))
    result = done.finish()
    assert done.finish() is result
    with pytest.raises(RuntimeError):
        done.feed(b"x")


FUZZ_FILES = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "rtplan.dcm"]


def test_corrupted_input_raises_only_dicom_parse_error() -> None:
    rng = random.Random(20261123)
    originals = {name: bundled(name) for name in FUZZ_FILES}
    outcomes = {"ok": 0, "rejected": 0}
    messages: set[str] = set()
    for _ in range(400):
        raw = bytearray(originals[rng.choice(FUZZ_FILES)])
        at = rng.randrange(132, min(len(raw), 3000))
        match rng.randrange(3):
            case 0:
                raw[at] = rng.randrange(256)
            case 1:
                raw[at : at + 4] = rng.randbytes(4)
            case _:
                del raw[at : at + rng.randint(1, 16)]
        try:
            parse(bytes(raw), rng.choice([1, 13, 4096]), max_header_bytes=1 << 20)
            outcomes["ok"] += 1
        except DicomParseError as exc:
            messages.add(str(exc).split(":")[0])
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 50
    assert "" not in messages
