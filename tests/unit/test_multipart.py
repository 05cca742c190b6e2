"""The streaming multipart/related parser."""

from __future__ import annotations

import pytest

from services.ingest.multipart import (
    BodyEnd,
    MalformedMultipartError,
    MultipartStream,
    PartBegin,
    PartData,
    PartEnd,
)
from tests import multipart_util


def _parse(body: bytes, boundary: str, step: int) -> list[tuple[dict[str, str], bytes]]:
    stream = MultipartStream(boundary)
    parts: list[tuple[dict[str, str], bytearray]] = []
    ended = False
    for i in range(0, len(body), step):
        for event in stream.feed(body[i : i + step]):
            if isinstance(event, PartBegin):
                parts.append((event.headers, bytearray()))
            elif isinstance(event, PartData):
                parts[-1][1].extend(event.data)
            elif isinstance(event, PartEnd):
                pass
            elif isinstance(event, BodyEnd):
                ended = True
    stream.close()
    assert ended
    return [(h, bytes(b)) for h, b in parts]


@pytest.mark.parametrize("step", [1, 2, 7, 64, 4096, 1 << 20])
def test_parts_survive_any_chunking(step: int) -> None:
    payloads = [b"", b"\r\n--not-the-boundary\r\n", bytes(range(256)) * 50, b"x"]
    body, _ = multipart_util.encode(payloads, boundary="bNd")
    parts = _parse(body, "bNd", step)
    assert [p for _, p in parts] == payloads
    assert all(h["content-type"] == "application/dicom" for h, _ in parts)


def test_preamble_and_epilogue_are_ignored() -> None:
    body, _ = multipart_util.encode([b"abc"], boundary="q")
    parts = _parse(b"a preamble line\r\n" + body + b"trailing epilogue", "q", 5)
    assert [p for _, p in parts] == [b"abc"]


def test_body_without_closing_delimiter_is_malformed() -> None:
    stream = MultipartStream("q")
    stream.feed(b"--q\r\nContent-Type: application/dicom\r\n\r\npartial")
    with pytest.raises(MalformedMultipartError):
        stream.close()


def test_no_boundary_in_body_is_malformed() -> None:
    with pytest.raises(MalformedMultipartError):
        MultipartStream("q").feed(b"x" * 100_000)


def test_oversized_part_headers_are_refused() -> None:
    stream = MultipartStream("q")
    with pytest.raises(MalformedMultipartError):
        stream.feed(b"--q\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")


@pytest.mark.parametrize("boundary", ["", "x" * 71])
def test_boundary_length_is_checked(boundary: str) -> None:
    with pytest.raises(MalformedMultipartError):
        MultipartStream(boundary)
