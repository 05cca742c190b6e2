"""Rendering query parameters and media type negotiation (PS3.18 8.3.5, 8.7.4)."""

from __future__ import annotations

import pytest

from pacslib.errors import BadRequestError, NotAcceptableError
from services.render.params import RenderParams, Viewport, parse_params
from services.render.pixel_module import Window


def _parse(query: dict[str, str] | list[tuple[str, str]], accept: str | None = None) -> RenderParams:
    items = list(query.items()) if isinstance(query, dict) else query
    return parse_params(items, accept, max_viewport=4096)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, ("image/jpeg", False)),
        ("*/*", ("image/jpeg", False)),
        ("image/*", ("image/jpeg", False)),
        ("image/png", ("image/png", False)),
        ("image/webp, image/gif;q=0.5", ("image/gif", False)),
        ("image/jpeg;q=0.2, image/png", ("image/png", False)),
        ('multipart/related; type="image/png"', ("image/png", True)),
        ("multipart/related; type=image/jpeg", ("image/jpeg", True)),
    ],
)
def test_media_type_from_the_accept_header(accept: str | None, expected: tuple[str, bool]) -> None:
    params = _parse({}, accept)
    assert (params.media_type, params.multipart) == expected


def test_the_accept_query_parameter_overrides_the_header() -> None:
    assert _parse({"accept": "image/png"}, "image/jpeg").media_type == "image/png"


@pytest.mark.parametrize(
    "accept", ["application/dicom", "text/html", 'multipart/related; type="application/dicom"', "video/mp4"]
)
def test_media_types_that_are_not_rendered_are_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptableError):
        _parse({}, accept)


def test_defaults() -> None:
    assert _parse({}) == RenderParams()
    thumbnail = parse_params([], None, max_viewport=4096, default_viewport=128)
    assert thumbnail.viewport == Viewport(128, 128)


@pytest.mark.parametrize(
    ("text", "window"),
    [
        ("40,400", Window(40.0, 400.0, "LINEAR")),
        ("40,400,linear", Window(40.0, 400.0, "LINEAR")),
        ("-600.5,1500,LINEAR-EXACT", Window(-600.5, 1500.0, "LINEAR_EXACT")),
        ("0,0.5,sigmoid", Window(0.0, 0.5, "SIGMOID")),
    ],
)
def test_window(text: str, window: Window) -> None:
    assert _parse({"window": text}).window == window


@pytest.mark.parametrize(
    "text",
    [
        "40",
        "40,400,linear,x",
        "a,400",
        "40,nan",
        "40,inf",
        "40,0",
        "40,0.5,linear",
        "40,-1,sigmoid",
        "40,400,gamma",
    ],
)
def test_bad_window(text: str) -> None:
    with pytest.raises(BadRequestError, match="window"):
        _parse({"window": text})


@pytest.mark.parametrize(
    ("text", "viewport"),
    [
        ("512,512", Viewport(512, 512)),
        ("4096,1", Viewport(4096, 1)),
        ("100,50,10,20", Viewport(100, 50, 10, 20)),
        ("100,50,10,20,-30,40", Viewport(100, 50, 10, 20, -30, 40)),
    ],
)
def test_viewport(text: str, viewport: Viewport) -> None:
    assert _parse({"viewport": text}).viewport == viewport


@pytest.mark.parametrize(
    "text",
    [
        "4097,10",
        "10,4097",
        "0,10",
        "-5,10",
        "10",
        "10,10,1",
        "a,b",
        "10,10,-1,0",
        "10,10,0,0,0,5",
        "99999999999,1",
    ],
)
def test_bad_or_absurd_viewport(text: str) -> None:
    with pytest.raises(BadRequestError, match="viewport"):
        _parse({"viewport": text})


@pytest.mark.parametrize(
    ("text", "ok"), [("1", True), ("100", True), ("0", False), ("101", False), ("high", False)]
)
def test_quality(text: str, ok: bool) -> None:
    if ok:
        assert _parse({"quality": text}).quality == int(text)
    else:
        with pytest.raises(BadRequestError, match="quality"):
            _parse({"quality": text})


def test_annotation() -> None:
    assert _parse({"annotation": "technique"}).annotations == frozenset({"technique"})
    with pytest.raises(BadRequestError, match="patient identity"):
        _parse({"annotation": "patient,technique"})
    with pytest.raises(BadRequestError):
        _parse({"annotation": "overlay"})


def test_a_repeated_parameter_and_icc_profiles_are_refused() -> None:
    with pytest.raises(BadRequestError, match="only once"):
        _parse([("window", "1,2"), ("window", "3,4")])
    assert _parse({"iccprofile": "no"}) == RenderParams()
    with pytest.raises(BadRequestError, match="iccprofile"):
        _parse({"iccprofile": "srgb"})


def test_unknown_parameters_are_ignored() -> None:
    assert _parse({"charset": "utf-8", "includefield": "all"}) == RenderParams()
