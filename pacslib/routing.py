"""The one routing table: which service answers which method and path under the public base URL.

The embedded gateway routes with it, and the Helm chart renders it into cluster routes, so the two
can never disagree. Order matters: the first matching route wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DICOMWEB_PREFIX = "/dicom-web"

SERVICES = ("auth", "ingest", "storage", "render", "audit")


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    pattern: str  # a regular expression matched against the whole path
    methods: frozenset[str] | None  # None: any method
    description: str

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and re.fullmatch(
            self.pattern, path
        ) is not None


_SEGMENT = r"[^/]+"

ROUTES: tuple[Route, ...] = (
    Route(
        "ingest",
        rf"{DICOMWEB_PREFIX}/studies(/{_SEGMENT})?",
        frozenset({"POST"}),
        "STOW-RS: store instances",
    ),
    Route(
        "storage",
        rf"{DICOMWEB_PREFIX}/studies/{_SEGMENT}/deidentify",
        frozenset({"POST"}),
        "de-identified copy of a study",
    ),
    Route(
        "render",
        rf"{DICOMWEB_PREFIX}/studies/.+/(rendered|thumbnail)",
        frozenset({"GET", "HEAD"}),
        "WADO-RS rendered and thumbnail resources",
    ),
    Route(
        "storage",
        rf"{DICOMWEB_PREFIX}(/.*)?",
        frozenset({"GET", "HEAD", "DELETE"}),
        "QIDO-RS search and WADO-RS retrieve",
    ),
    Route("auth", r"/(auth|oauth2|\.well-known)(/.*)?", None, "accounts, tokens, OIDC"),
    Route("audit", r"/audit(/.*)?", None, "audit log queries"),
    Route(
        "storage",
        rf"/export/studies/{_SEGMENT}",
        frozenset({"GET", "HEAD"}),
        "study export as a ZIP archive",
    ),
    Route("render", r"/viewer(/.*)?", frozenset({"GET", "HEAD"}), "browser viewer"),
)


def resolve(method: str, path: str) -> str | None:
    """The service that answers ``method path``, or None when no route matches."""
    for route in ROUTES:
        if route.matches(method, path):
            return route.service
    return None
