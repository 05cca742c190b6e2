"""Rendering query parameters (PS3.18 8.3.5) and the rendered media type (PS3.18 8.7.4).

``window=center,width[,function]`` (linear, linear-exact, sigmoid), ``viewport=vw,vh[,sx,sy[,sw,sh]]``
(scale the source region to fit vw x vh, aspect kept; a negative sw or sh flips), ``quality=1..100``
(JPEG), ``annotation=technique`` and ``accept=`` (overrides the Accept header). Every malformed value
is a 400 that says which parameter and why; a viewport larger than the configured maximum is refused
rather than rendered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pacslib.errors import BadRequestError, NotAcceptableError
from pacslib.negotiation import MediaRange, parse_accept
from services.render.pixel_module import Window

IMAGE_JPEG = "image/jpeg"
IMAGE_PNG = "image/png"
IMAGE_GIF = "image/gif"
RENDERED_TYPES = (IMAGE_JPEG, IMAGE_PNG, IMAGE_GIF)
MULTIPART_RELATED = "multipart/related"
DEFAULT_QUALITY = 90
WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
ANNOTATIONS = frozenset({"technique"})
SINGLE_VALUED = ("window", "viewport", "quality", "annotation", "accept", "iccprofile")


@dataclass(frozen=True, slots=True)
class Viewport:
    """Fit the source region ``[sx, sx+sw) x [sy, sy+sh)`` into ``width`` x ``height``."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None  # None: to the right edge; negative: flipped horizontally
    sh: int | None = None  # None: to the bottom edge; negative: flipped vertically


@dataclass(frozen=True, slots=True)
class RenderParams:
    media_type: str = IMAGE_JPEG
    multipart: bool = False  # the client asked for multipart/related even for one image
    quality: int = DEFAULT_QUALITY
    window: Window | None = None
    viewport: Viewport | None = None
    annotations: frozenset[str] = frozenset()


def parse_params(
    query: Sequence[tuple[str, str]],
    accept_header: str | None,
    *,
    max_viewport: int,
    default_viewport: int | None = None,
) -> RenderParams:
    """Parse the rendering parameters of a request; BadRequestError or NotAcceptableError when wrong."""
    values: dict[str, str] = {}
    for key, value in query:
        if key in SINGLE_VALUED:
            if key in values:
                raise BadRequestError(f"the {key} parameter may be given only once")
            values[key] = value
    media_type, multipart = choose_media_type(parse_accept(values.get("accept", accept_header)))
    if values.get("iccprofile", "no").strip().lower() != "no":
        raise BadRequestError(
            "iccprofile: rendered images carry no ICC profile; only iccprofile=no is supported"
        )
    viewport = _viewport(values["viewport"], max_viewport) if "viewport" in values else None
    if viewport is None and default_viewport is not None:
        viewport = Viewport(default_viewport, default_viewport)
    return RenderParams(
        media_type=media_type,
        multipart=multipart,
        quality=_quality(values["quality"]) if "quality" in values else DEFAULT_QUALITY,
        window=_window(values["window"]) if "window" in values else None,
        viewport=viewport,
        annotations=_annotations(values["annotation"]) if "annotation" in values else frozenset(),
    )


def choose_media_type(accept: list[MediaRange]) -> tuple[str, bool]:
    """The rendered media type to send and whether multipart/related was asked for; 406 otherwise."""
    for media in accept:
        if media.essence == MULTIPART_RELATED:
            kind, _, subtype = media.params.get("type", IMAGE_JPEG).strip().lower().partition("/")
            chosen = _image_type(MediaRange(kind, subtype)) if subtype else None
            if chosen is not None:
                return chosen, True
            continue
        chosen = _image_type(media)
        if chosen is not None:
            return chosen, False
    raise NotAcceptableError(
        "rendered resources are available as image/jpeg, image/png or image/gif "
        '(or multipart/related; type="image/jpeg" and so on)'
    )


def _image_type(media: MediaRange) -> str | None:
    if media.essence in RENDERED_TYPES:
        return media.essence
    if media.covers(IMAGE_JPEG):  # image/*, */*
        return IMAGE_JPEG
    return None


def _numbers(name: str, text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if len(text) > 200 or not parts:
        raise BadRequestError(f"{name}: malformed value")
    return parts


def _int(name: str, text: str) -> int:
    if not text.lstrip("-").isdigit() or len(text) > 9:
        raise BadRequestError(f"{name}: {text!r} is not an integer")
    return int(text)


def _float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BadRequestError(f"{name}: values must be finite numbers")
    return value


def _quality(text: str) -> int:
    quality = _int("quality", text.strip())
    if not 1 <= quality <= 100:
        raise BadRequestError("quality: must be an integer from 1 to 100")
    return quality


def _window(text: str) -> Window:
    parts = _numbers("window", text)
    if len(parts) not in (2, 3):
        raise BadRequestError(
            "window: expected center,width,function (function: linear, linear-exact, sigmoid)"
        )
    center, width = _float("window", parts[0]), _float("window", parts[1])
    function = WINDOW_FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else "LINEAR"
    if function is None:
        raise BadRequestError("window: the function must be linear, linear-exact or sigmoid")
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise BadRequestError("window: the width must be positive (at least 1 for linear)")
    return Window(center, width, function)


def _viewport(text: str, max_viewport: int) -> Viewport:
    parts = _numbers("viewport", text)
    if len(parts) not in (2, 4, 6):
        raise BadRequestError("viewport: expected vw,vh or vw,vh,sx,sy or vw,vh,sx,sy,sw,sh")
    numbers = [_int("viewport", p) for p in parts]
    width, height = numbers[0], numbers[1]
    if not (1 <= width <= max_viewport and 1 <= height <= max_viewport):
        raise BadRequestError(f"viewport: width and height must be from 1 to {max_viewport} pixels")
    if len(numbers) == 2:
        return Viewport(width, height)
    sx, sy = numbers[2], numbers[3]
    if sx < 0 or sy < 0:
        raise BadRequestError("viewport: sx and sy must not be negative")
    sw, sh = (numbers[4], numbers[5]) if len(numbers) == 6 else (None, None)
    if sw == 0 or sh == 0:
        raise BadRequestError("viewport: sw and sh must not be zero")
    return Viewport(width, height, sx, sy, sw, sh)


def _annotations(text: str) -> frozenset[str]:
    wanted = frozenset(p.strip().lower() for p in text.split(",") if p.strip())
    if "patient" in wanted:
        raise BadRequestError(
            "annotation: patient annotation is not offered (patient identity is never burned into "
            "rendered images); annotation=technique is"
        )
    unknown = wanted - ANNOTATIONS
    if unknown:
        raise BadRequestError("annotation: the supported value is technique")
    return wanted
