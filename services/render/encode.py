"""From display values to an image file: source region, viewport scaling, annotation, encoding.

Encoding is Pillow's: its wheels bundle libjpeg-turbo (SIMD JPEG) and zlib, it also writes PNG and GIF
and resamples, and it is among the best-kept imaging libraries in Python. A 512x512 grayscale JPEG
encodes in about a millisecond, so a separate JPEG-only encoder would not pay for a second dependency.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pacslib.errors import BadRequestError
from services.render.params import IMAGE_GIF, IMAGE_JPEG, RenderParams, Viewport

# PNG is lossless at every level; level 1 is several times faster than the default 6 for ~10% more bytes.
PNG_COMPRESS_LEVEL = 1


def render_image(display: np.ndarray, params: RenderParams, caption: str | None = None) -> bytes:
    """Crop, scale and encode 8-bit display values as ``params.media_type``."""
    region = source_region(display, params.viewport)
    image = Image.fromarray(np.ascontiguousarray(region))
    image = fit_viewport(image, params.viewport)
    if caption:
        annotate(image, caption)
    return encode(image, params)


def source_region(display: np.ndarray, viewport: Viewport | None) -> np.ndarray:
    """The part of the image the viewport's sx, sy, sw, sh select (flipped for negative sw, sh)."""
    if viewport is None:
        return display
    rows, columns = display.shape[:2]
    x0, x1, flip_x = _span(viewport.sx, viewport.sw, columns)
    y0, y1, flip_y = _span(viewport.sy, viewport.sh, rows)
    if x1 <= x0 or y1 <= y0:
        raise BadRequestError("viewport: the source region lies outside the image")
    region = display[y0:y1, x0:x1]
    if flip_x:
        region = region[:, ::-1]
    if flip_y:
        region = region[::-1]
    return region


def _span(start: int, length: int | None, size: int) -> tuple[int, int, bool]:
    if length is None:
        length = size - start
    low, high, flip = (start, start + length, False) if length > 0 else (start + length, start, True)
    return max(0, low), min(size, high), flip


def fit_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    """Scale to fit ``viewport`` (width x height), keeping the aspect ratio."""
    if viewport is None:
        return image
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    reducing_gap = 2.0 if scale < 1 else None  # downscale: box-reduce first, then bilinear (fast, smooth)
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=reducing_gap)


def annotate(image: Image.Image, caption: str) -> None:
    """Burn a technique caption (window, frame, size) into the bottom-left corner."""
    size = max(9, min(image.height, image.width * 2) // 28)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    _, top, _, bottom = draw.multiline_textbbox((0, 0), caption, font=font)
    y = image.height - (bottom - top) - size // 2
    white = 255 if image.mode == "L" else (255, 255, 255)
    black = 0 if image.mode == "L" else (0, 0, 0)
    draw.multiline_text(
        (size // 2, y - top), caption, font=font, fill=white, stroke_width=1, stroke_fill=black
    )


def encode(image: Image.Image, params: RenderParams) -> bytes:
    out = BytesIO()
    if params.media_type == IMAGE_JPEG:
        image.save(out, "JPEG", quality=params.quality)
    elif params.media_type == IMAGE_GIF:
        if image.mode == "RGB":
            image = image.quantize(colors=256)
        image.save(out, "GIF")
    else:
        image.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()
