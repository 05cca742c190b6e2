"""WADO-RS bulkdata: element paths, byte ranges, stored markers, negotiation and big endian swapping."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pacslib.errors import BadRequestError, NotAcceptableError, NotFoundError
from pacslib.negotiation import parse_accept
from services.ingest.dicom_stream import bulk_marker
from services.storage.bulk_markers import resolve_markers
from services.storage.bulkdata import (
    BulkPlan,
    BulkValue,
    ByteRange,
    RangeNotSatisfiableError,
    encapsulated_document_type,
    find_bulk_value,
    format_element_path,
    parse_element_path,
    parse_range,
    plan_value,
    swap_words,
    swapped_slice,
    word_bytes,
)

EVRLE = "1.2.840.10008.1.2.1"
IVRLE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
INSTANCE = "https://pacs.example/dicom-web/studies/1.2/series/1.3/instances/1.4"


# ---------------------------------------------------------------------------- element paths


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("00091011", (0x00091011,)),
        ("7fe00010", (0x7FE00010,)),
        ("0040A730/0/00091011", (0x0040A730, 0, 0x00091011)),
        ("0040A730/12/00540016/999999/00181072", (0x0040A730, 12, 0x00540016, 999999, 0x00181072)),
    ],
)
def test_element_paths(text: str, path: tuple[int, ...]) -> None:
    assert parse_element_path(text) == path
    assert format_element_path(path) == text.upper()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0009101",
        "000910111",
        "GGGG1011",
        "00091011/",
        "/00091011",
        "00091011/0",
        "0040A730//00091011",
        "0040A730/01/00091011",  # not canonical
        "0040A730/-1/00091011",
        "0040A730/+1/00091011",
        "0040A730/1234567/00091011",  # absurd item index
        "0040A730/x/00091011",
        "../00091011",
        "0x091011",
        "0040A730/0/" * 17 + "00091011",  # deeper than ingest accepts
    ],
)
def test_absurd_paths_are_bad_requests(text: str) -> None:
    with pytest.raises(BadRequestError, match="bulk data path"):
        parse_element_path(text)


def test_deepest_path_ingest_accepts() -> None:
    text = "0040A730/0/" * 16 + "00091011"
    assert len(parse_element_path(text)) == 33


def test_the_ingest_marker_and_the_url_agree_on_paths() -> None:
    path = (0x0040A730, 3, 0x00091011)
    marker = bulk_marker(path, "10;20")
    assert marker == f"pacs-bulk:{format_element_path(path)};10;20"


# ---------------------------------------------------------------------------- byte ranges


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-1000", (0, 100)),  # a suffix longer than the value: all of it
        ("bytes=90-1000", (90, 100)),  # last position past the end: up to the end
        ("bytes=99-99", (99, 100)),
        ("BYTES = 0-0 ", (0, 1)),
        ("bytes=0-9,", (0, 10)),  # empty list elements do not count
    ],
)
def test_satisfiable_single_ranges(header: str, expected: tuple[int, int]) -> None:
    byte_range = parse_range(header, 100)
    assert byte_range == ByteRange(*expected, 100)


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=999-1000"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError) as raised:
        parse_range(header, 100)
    assert raised.value.size == 100
    assert raised.value.status_code == 416


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "items=0-9",  # unknown unit: ignored (RFC 9110 14.2)
        "bytes",
        "bytes=",
        "bytes=abc",
        "bytes=5-1",  # last before first: invalid, so ignored rather than unsatisfiable
        "bytes=1-2-3",
        "bytes=0-1,5-6",  # several ranges: the whole value is sent
        "bytes= 0 - 9",
        "bytes=" + "9" * 20 + "-",
    ],
)
def test_ignored_ranges(header: str | None) -> None:
    assert parse_range(header, 100) is None


def test_content_range_and_empty_values() -> None:
    byte_range = parse_range("bytes=5-", 10)
    assert byte_range is not None
    assert byte_range.content_range == "bytes 5-9/10"
    assert parse_range("bytes=0-", 0) is None


# ---------------------------------------------------------------------------- markers


def _doc() -> dict[str, Any]:
    return {
        "00091010": {"vr": "LO", "Value": ["pacs-bulk:00091011;1;2"]},
        "00091011": {"vr": "OB", "BulkDataURI": bulk_marker((0x00091011,), "1000;2000")},
        "00091012": {"vr": "OB", "InlineBinary": "AAE="},
        "0040A730": {
            "vr": "SQ",
            "Value": [
                {},
                {
                    "00091011": {
                        "vr": "OW",
                        "BulkDataURI": bulk_marker((0x0040A730, 1, 0x00091011), "5000;64"),
                    }
                },
            ],
        },
        "00280100": {"vr": "US", "Value": [16]},
        "7FE00010": {"vr": "OB", "BulkDataURI": bulk_marker((0x7FE00010,), "frames")},
    }


def test_markers_become_absolute_uris_and_nothing_else_changes() -> None:
    doc = _doc()
    doc["00104000"] = {"vr": "LT", "Value": ['he wrote "BulkDataURI":"pacs-bulk:00091011;1;2" here']}
    resolved = json.loads(resolve_markers(json.dumps(doc, separators=(",", ":")), INSTANCE))
    assert resolved["00091011"] == {"vr": "OB", "BulkDataURI": f"{INSTANCE}/bulkdata/00091011"}
    nested = resolved["0040A730"]["Value"][1]["00091011"]
    assert nested["BulkDataURI"] == f"{INSTANCE}/bulkdata/0040A730/1/00091011"
    assert resolved["7FE00010"]["BulkDataURI"] == f"{INSTANCE}/bulkdata/7FE00010"
    for key in ("00091010", "00091012", "00104000", "00280100"):
        assert resolved[key] == doc[key]


def test_metadata_without_markers_is_left_as_it_is() -> None:
    text = json.dumps({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]}}, separators=(",", ":"))
    assert resolve_markers(text, INSTANCE) is text


def test_finding_bulk_values() -> None:
    doc = _doc()
    assert find_bulk_value(doc, (0x00091011,)) == BulkValue((0x00091011,), "OB", 1000, 2000, False)
    nested = find_bulk_value(doc, (0x0040A730, 1, 0x00091011))
    assert (nested.vr, nested.offset, nested.length) == ("OW", 5000, 64)
    assert find_bulk_value(doc, (0x7FE00010,)).from_frames


@pytest.mark.parametrize(
    "path",
    [
        (0x00091013,),  # no such element
        (0x00091012,),  # inline, no bulk data
        (0x00091010,),  # a string that looks like a marker is not one
        (0x00280100,),
        (0x0040A730,),  # a sequence
        (0x0040A730, 2, 0x00091011),  # no such item
        (0x0040A730, 0, 0x00091011),  # not in that item
        (0x00091011, 0, 0x00091011),  # not a sequence
    ],
)
def test_paths_without_bulk_values_are_not_found(path: tuple[int, ...]) -> None:
    with pytest.raises(NotFoundError):
        find_bulk_value(_doc(), path)


def test_a_marker_under_another_path_is_not_served() -> None:
    doc = {"00091011": {"vr": "OB", "BulkDataURI": bulk_marker((0x00091012,), "1;2")}}
    with pytest.raises(NotFoundError):
        find_bulk_value(doc, (0x00091011,))


# ---------------------------------------------------------------------------- negotiation


@pytest.mark.parametrize(
    ("accept", "stored", "plan"),
    [
        (None, EVRLE, BulkPlan(True, "application/octet-stream", EVRLE, 0)),
        ("*/*", BIG_ENDIAN, BulkPlan(True, "application/octet-stream", EVRLE, 2)),
        (
            'multipart/related; type="application/octet-stream"',
            EVRLE,
            BulkPlan(True, "application/octet-stream", EVRLE, 0),
        ),
        (
            "multipart/related; type=application/octet-stream",
            BIG_ENDIAN,
            BulkPlan(True, "application/octet-stream", EVRLE, 2),
        ),
        ('multipart/related; type="*/*"', IVRLE, BulkPlan(True, "application/octet-stream", EVRLE, 0)),
        ("multipart/related", EVRLE, BulkPlan(True, "application/octet-stream", EVRLE, 0)),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            BIG_ENDIAN,
            BulkPlan(True, "application/octet-stream", BIG_ENDIAN, 0),
        ),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            JPEG_2000,
            BulkPlan(True, "application/octet-stream", EVRLE, 0),  # non-pixel values are not compressed
        ),
        ("application/octet-stream", BIG_ENDIAN, BulkPlan(False, "application/octet-stream", EVRLE, 2)),
        (
            f"multipart/related; type=application/octet-stream; transfer-syntax={BIG_ENDIAN}",
            BIG_ENDIAN,
            BulkPlan(True, "application/octet-stream", BIG_ENDIAN, 0),
        ),
        (
            f"application/octet-stream; transfer-syntax={IVRLE}",
            IVRLE,
            BulkPlan(False, "application/octet-stream", IVRLE, 0),
        ),
        (
            "image/jpeg, multipart/related; type=image/jpeg, application/octet-stream;q=0.5",
            EVRLE,
            BulkPlan(False, "application/octet-stream", EVRLE, 0),
        ),
    ],
)
def test_value_negotiation(accept: str | None, stored: str, plan: BulkPlan) -> None:
    assert plan_value(parse_accept(accept), stored_syntax=stored, swap_width=2) == plan


@pytest.mark.parametrize(
    "accept",
    [
        "image/jpeg",
        'multipart/related; type="image/jpeg"',
        "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50",
        f"multipart/related; type=application/octet-stream; transfer-syntax={IVRLE}",  # stored as EVRLE
        "application/dicom+json",
    ],
)
def test_unacceptable_bulk_media_types(accept: str) -> None:
    with pytest.raises(NotAcceptableError, match="application/octet-stream"):
        plan_value(parse_accept(accept), stored_syntax=EVRLE, swap_width=0)


def test_an_encapsulated_document_can_be_asked_for_in_its_own_type() -> None:
    doc = {"00420012": {"vr": "LO", "Value": ["Application/PDF "]}}
    kind = encapsulated_document_type(doc, (0x00420011,))
    assert kind == "application/pdf"
    assert encapsulated_document_type(doc, (0x00091011,)) is None
    ohif = 'multipart/related; type="application/pdf", multipart/related; type="application/octet-stream"'
    plan = plan_value(parse_accept(ohif), stored_syntax=EVRLE, swap_width=0, document_type=kind)
    assert plan == BulkPlan(True, "application/pdf", None, 0)
    plan = plan_value(parse_accept(ohif), stored_syntax=EVRLE, swap_width=0, document_type=None)
    assert plan.media_type == "application/octet-stream"


@pytest.mark.parametrize(
    ("path", "vr", "bits", "width"),
    [
        ((0x7FE00010,), "OW", 16, 2),
        ((0x7FE00010,), "OW", 8, 2),
        ((0x7FE00010,), "OW", 32, 4),
        ((0x7FE00010,), "OB", 8, 0),
        ((0x7FE00008,), "OF", 32, 4),
        ((0x7FE00009,), "OD", 64, 8),
        ((0x60003000,), "OW", 16, 2),
        ((0x00091011,), "OB", 16, 0),
        ((0x00091011,), "UN", 16, 0),
        ((0x0040A730, 0, 0x00091011), "OL", None, 4),
        ((0x00091011,), "OV", None, 8),
    ],
)
def test_word_sizes(path: tuple[int, ...], vr: str, bits: int | None, width: int) -> None:
    assert word_bytes(BulkValue(path, vr, 0, 8, False), bits) == width


# ---------------------------------------------------------------------------- big endian values


async def _chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _reference(value: bytes, width: int) -> bytes:
    whole = len(value) - len(value) % width
    out = bytearray()
    for i in range(0, whole, width):
        out += value[i : i + width][::-1]
    return bytes(out) + value[whole:]


async def test_swapped_slices_match_a_whole_value_swap() -> None:
    rng = random.Random(7)
    for _ in range(400):
        width = rng.choice([2, 4, 8])
        value = rng.randbytes(rng.randrange(1, 80))
        start = rng.randrange(len(value))
        end = rng.randrange(start + 1, len(value) + 1)
        first = start - start % width
        last = min(-(-end // width) * width, len(value))
        chunks = _chunked(value[first:last], rng.choice([1, 3, 5, 8, 1 << 20]))
        got = b"".join(
            [c async for c in swapped_slice(chunks, width, len(value) - first, start - first, end - start)]
        )
        assert got == _reference(value, width)[start:end], (width, len(value), start, end)


def test_swap_words() -> None:
    assert swap_words(bytes(range(8)), 2) == bytes([1, 0, 3, 2, 5, 4, 7, 6])
    assert swap_words(bytes(range(8)), 4) == bytes([3, 2, 1, 0, 7, 6, 5, 4])
    assert swap_words(bytes(range(8)), 8) == bytes(range(8))[::-1]
