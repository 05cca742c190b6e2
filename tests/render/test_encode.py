"""Viewport region selection, scaling and encoding of display values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pacslib.errors import BadRequestError
from services.render.encode import fit_viewport, render_image, source_region
from services.render.params import RenderParams, Viewport

IMAGE = np.arange(20 * 30, dtype=np.uint32).reshape(20, 30).astype(np.uint8)


def test_region_defaults_to_the_rest_of_the_image() -> None:
    assert np.array_equal(source_region(IMAGE, Viewport(10, 10, 5, 4)), IMAGE[4:, 5:])
    assert source_region(IMAGE, None) is IMAGE


def test_negative_region_sizes_flip() -> None:
    assert np.array_equal(source_region(IMAGE, Viewport(10, 10, 30, 0, -30, 20)), IMAGE[:, ::-1])
    assert np.array_equal(source_region(IMAGE, Viewport(10, 10, 0, 20, 30, -20)), IMAGE[::-1])


def test_region_is_clipped_to_the_image_and_must_overlap_it() -> None:
    assert np.array_equal(source_region(IMAGE, Viewport(10, 10, 25, 15, 100, 100)), IMAGE[15:, 25:])
    with pytest.raises(BadRequestError, match="outside"):
        source_region(IMAGE, Viewport(10, 10, 40, 0, 5, 5))


@pytest.mark.parametrize(
    ("viewport", "size"),
    [
        (Viewport(60, 60), (60, 40)),
        (Viewport(15, 100), (15, 10)),
        (Viewport(300, 20), (30, 20)),
        (Viewport(1, 1), (1, 1)),
    ],
)
def test_scaling_keeps_the_aspect_ratio(viewport: Viewport, size: tuple[int, int]) -> None:
    assert fit_viewport(Image.fromarray(IMAGE), viewport).size == size


@pytest.mark.parametrize(
    ("media_type", "magic"), [("image/jpeg", b"\xff\xd8"), ("image/png", b"\x89PNG"), ("image/gif", b"GIF8")]
)
def test_encodings(media_type: str, magic: bytes) -> None:
    for display in (IMAGE, np.stack([IMAGE, 255 - IMAGE, IMAGE // 2], axis=-1)):
        data = render_image(display, RenderParams(media_type=media_type))
        assert data.startswith(magic)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if display.ndim == 3 else "L"))
        if media_type == "image/png" or (media_type == "image/gif" and display.ndim == 2):
            assert np.array_equal(decoded, display)


def test_jpeg_quality_changes_the_size() -> None:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    assert len(render_image(noise, RenderParams(quality=20))) < len(
        render_image(noise, RenderParams(quality=95))
    )
