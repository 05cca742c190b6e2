"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4): what each one renders.

Every image starts with one call to storage for one frame, on behalf of the user: storage checks
need-to-know, records the access and sends the frame's bytes, or (when render holds a decoded copy of
exactly that stored frame, named by its ETag) confirms in a 304 that the copy is current. So a cached
frame is only ever served after storage has confirmed this user's access for this request, and
windowing changes on a frame a viewer already saw cost no storage read, decryption or decode.

Caching decision: decoded frames are cached (keyed by study, series, instance and frame; validated by
storage's ETag on every request), plus the encoded images made from them (keyed by the ETag and the
rendering parameters) for identical repeated requests such as thumbnails. Both are bounded in bytes
and live in this process's memory only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from pydicom.uid import UID

from pacslib.errors import NotAcceptableError, ServiceUnavailableError, UnsupportedMediaTypeError
from services.render.cache import ByteLRU
from services.render.decode import decode_frame
from services.render.encode import render_image
from services.render.params import RenderParams
from services.render.pipeline import to_display
from services.render.pixel_module import PixelModule, Window, parse_pixel_module
from services.render.source import Caller, FrameSource, SourceInstance
from services.render.workers import WorkPool

# Frames of at most this many values (and images no larger) are rendered on the event loop.
INLINE_MAX_VALUES = 512 * 512


@dataclass(frozen=True, slots=True)
class FrameRef:
    study: str
    series: str
    sop: str
    frame: int  # 1-based

    @property
    def rendered_path(self) -> str:
        return (
            f"/dicom-web/studies/{self.study}/series/{self.series}/instances/{self.sop}"
            f"/frames/{self.frame}/rendered"
        )


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    etag: str
    module: PixelModule
    pixels: np.ndarray


class Renderer:
    """Renders frames fetched from storage, with the two in-memory caches."""

    def __init__(
        self,
        source: FrameSource,
        pool: WorkPool,
        *,
        frame_cache_bytes: int,
        image_cache_bytes: int,
        max_frame_pixels: int,
    ) -> None:
        self.source = source
        self.pool = pool
        self.frames: ByteLRU[DecodedFrame] = ByteLRU(frame_cache_bytes)
        self.images: ByteLRU[bytes] = ByteLRU(image_cache_bytes)
        self.max_frame_pixels = max_frame_pixels

    async def image(self, caller: Caller, ref: FrameRef, params: RenderParams) -> bytes:
        """One frame rendered as ``params`` asks (one storage call; caches used only after it)."""
        key = (ref.study, ref.series, ref.sop, ref.frame)
        held = self.frames.get(key)
        sent = await self.source.frame(
            caller, ref.study, ref.series, ref.sop, ref.frame, held.etag if held else None
        )
        # From here on storage has confirmed this caller's access to exactly the frame ``sent.etag``.
        cached = self.images.get((sent.etag, params))
        if cached is not None:
            return cached
        if sent.not_modified:
            if held is None or held.etag != sent.etag:
                raise ServiceUnavailableError("storage confirmed a frame this service does not hold")
            if _small(held.module, params):
                image = _render(held, params, ref.frame)
            else:
                image = await self.pool.run(_render, held, params, ref.frame)
        else:
            assert sent.module is not None
            assert sent.data is not None
            module = parse_pixel_module(sent.module)
            if module.rows * module.columns > self.max_frame_pixels:
                raise NotAcceptableError(
                    f"frames of {module.columns}x{module.rows} pixels are larger than this service renders"
                )
            if _small(module, params):
                decoded, image = _decode_and_render(sent.etag, module, sent.data, params, ref.frame)
            else:  # decode and render in one job: one hand-over to the worker threads per request
                decoded, image = await self.pool.run(
                    _decode_and_render, sent.etag, module, sent.data, params, ref.frame
                )
            self.frames.put(key, decoded, decoded.pixels.nbytes)
        self.images.put((sent.etag, params), image, len(image))
        return image

    async def renderable(self, caller: Caller, study: str, series: str | None) -> list[SourceInstance]:
        """The instances of a study or series that have frames to render, in display order."""
        found = [i for i in await self.source.instances(caller, study, series) if i.frames > 0]
        if not found:
            raise NotAcceptableError(f"no instance of this {'series' if series else 'study'} can be rendered")
        return found

    async def representative(self, caller: Caller, study: str, series: str | None) -> FrameRef:
        """The frame a study's or series' thumbnail shows: the middle instance of its first series."""
        instances = await self.renderable(caller, study, series)
        first = [i for i in instances if i.series_uid == instances[0].series_uid]
        chosen = first[len(first) // 2]
        return FrameRef(study, chosen.series_uid, chosen.sop_uid, 1)

    async def multipart(
        self, caller: Caller, refs: list[FrameRef], params: RenderParams, boundary: str
    ) -> AsyncIterator[bytes]:
        """Stream ``refs`` rendered as multipart/related parts; frames that cannot be rendered are left out.

        Raises NotAcceptableError before yielding anything when none of them can be rendered.
        """
        sent = 0
        for ref in refs:
            try:
                image = await self.image(caller, ref, params)
            except (NotAcceptableError, UnsupportedMediaTypeError):
                continue
            sent += 1
            yield (
                (
                    f"--{boundary}\r\nContent-Type: {params.media_type}\r\n"
                    f"Content-Location: {ref.rendered_path}\r\n\r\n"
                ).encode()
                + image
                + b"\r\n"
            )
        if not sent:
            raise NotAcceptableError("none of the requested images can be rendered")
        yield f"--{boundary}--\r\n".encode()

    async def close(self) -> None:
        self.pool.close()
        await self.source.close()


def _small(module: PixelModule, params: RenderParams) -> bool:
    """Whether rendering is cheap enough to do on the event loop rather than in a worker thread.

    An uncompressed frame of up to 512x512 grayscale values (and an image no larger) renders in about
    1 ms, mostly in Pillow's encoders, which hold the GIL: handing it to a worker thread and back cost
    as much again in thread wake-ups, and more on a busy machine. Compressed frames (whose decoders
    can take tens of milliseconds) and larger images still go to the pool.
    """
    values = module.rows * module.columns * module.samples_per_pixel
    if params.viewport is not None:
        values = max(values, params.viewport.width * params.viewport.height * module.samples_per_pixel)
    return values <= INLINE_MAX_VALUES and not UID(module.transfer_syntax).is_encapsulated


def _decode_and_render(
    etag: str, module: PixelModule, data: bytes, params: RenderParams, frame: int
) -> tuple[DecodedFrame, bytes]:
    decoded = DecodedFrame(etag, module, decode_frame(module, data))
    return decoded, _render(decoded, params, frame)


def _render(decoded: DecodedFrame, params: RenderParams, frame: int) -> bytes:
    display = to_display(decoded.pixels, decoded.module, params.window)
    caption = (
        technique_caption(decoded.module, params.window, frame) if "technique" in params.annotations else None
    )
    return render_image(display, params, caption)


def technique_caption(module: PixelModule, requested: Window | None, frame: int) -> str:
    """What ``annotation=technique`` burns in: the VOI used, the frame and the matrix size."""
    lines = []
    if module.is_monochrome:
        window = requested or (None if module.voi_luts else (module.windows[0] if module.windows else None))
        if window is not None:
            lines.append(f"W {window.width:g} C {window.center:g}")
        else:
            lines.append("VOI LUT" if module.voi_luts else "full range")
    lines.append(f"frame {frame}/{module.frame_count}  {module.columns}x{module.rows}")
    return "\n".join(lines)
