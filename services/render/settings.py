"""Render service settings (environment prefix ``PACS_RENDER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class RenderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_RENDER_", extra="ignore")

    port: int = Field(8046, ge=1, le=65535, description="Port to listen on.")
    storage_url: str = Field(
        "http://127.0.0.1:8045", description="Base URL of the storage service (frames to render)."
    )
    storage_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for storage to answer a frame or instance list."
    )
    frame_cache_bytes: int = Field(
        268435456,
        ge=0,
        description="Memory for decoded frames kept for the next request (0: no cache); never on disk.",
    )
    image_cache_bytes: int = Field(
        67108864,
        ge=0,
        description="Memory for encoded rendered images kept for identical requests (0: no cache).",
    )
    max_viewport: int = Field(
        4096, ge=16, le=16384, description="Largest viewport width or height a request may ask for."
    )
    max_frame_pixels: int = Field(
        100_000_000, ge=1, description="Largest frame (rows x columns) that is decoded and rendered."
    )
    thumbnail_size: int = Field(128, ge=16, le=1024, description="Default viewport of thumbnails.")
    render_threads: int = Field(
        2, ge=1, le=64, description="Threads that decode and encode images (CPU-bound work)."
    )
    viewer: bool = Field(True, description="Serve the browser viewer at <public URL>/viewer/.")
    viewer_idle_seconds: int = Field(
        900,
        ge=5,
        le=43200,
        description="The viewer signs out after this many seconds without keyboard, mouse or touch input.",
    )
