"""Bulk data markers in stored metadata, and their public form (absolute BulkDataURIs).

Ingest stores ``pacs-bulk:<path>;<offset>;<length>`` (or ``pacs-bulk:<path>;frames``) as the
BulkDataURI of each large binary value (see docs/bulkdata.md); responses rewrite them to
``<instance URL>/bulkdata/<path>``. Kept free of storage imports: QIDO and WADO both use it.
"""

from __future__ import annotations

import re

MARKER_PREFIX = "pacs-bulk:"

_MARKER_MEMBER = re.compile(r'"BulkDataURI":"pacs-bulk:([0-9A-F/]+);[^"]*"')


def instance_url(base_url: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """An instance's WADO-RS URL; ``base_url`` ends with ``/dicom-web``."""
    return f"{base_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def resolve_markers(document_json: str, instance: str) -> str:
    """Rewrite the bulk data markers of an instance's compact JSON metadata to absolute URLs."""
    if MARKER_PREFIX not in document_json:
        return document_json
    return _MARKER_MEMBER.sub(lambda m: f'"BulkDataURI":"{instance}/bulkdata/{m.group(1)}"', document_json)
