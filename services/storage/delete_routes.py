"""Placeholder router (being written); included by the app so that its routes go live when added."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicom-web")
