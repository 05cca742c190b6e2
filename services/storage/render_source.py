"""Placeholder router (being written): frames for the render service; included by the app."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/internal", include_in_schema=False)
