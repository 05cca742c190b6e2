"""Accept / Content-Type parsing."""

from __future__ import annotations

import pytest

from pacslib.errors import BadRequestError
from pacslib.negotiation import parse_accept, parse_media_type


def test_multipart_with_quoted_type_and_transfer_syntax() -> None:
    media = parse_media_type('multipart/related; type="application/dicom"; transfer-syntax=*; boundary="a b"')
    assert media.essence == "multipart/related"
    assert media.params == {"type": "application/dicom", "transfer-syntax": "*", "boundary": "a b"}


def test_accept_list_sorted_by_quality_and_zero_dropped() -> None:
    ranges = parse_accept("application/json;q=0.5, application/dicom+json, text/html;q=0")
    assert [r.essence for r in ranges] == ["application/dicom+json", "application/json"]


def test_absent_accept_means_anything() -> None:
    assert parse_accept(None)[0].essence == "*/*"
    assert parse_accept("  ")[0].covers("application/dicom+json")


def test_ohif_frame_accept_header() -> None:
    ranges = parse_accept("multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert ranges[0].params["type"] == "application/octet-stream"


@pytest.mark.parametrize("bad", ["nonsense", "a/b; q=abc", "a/b; q=7", "a/b junk", "/x"])
def test_malformed_is_bad_request(bad: str) -> None:
    with pytest.raises(BadRequestError):
        parse_accept(bad)
