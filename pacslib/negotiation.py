"""Parsing media types and Accept headers (RFC 9110) as DICOMweb uses them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pacslib.errors import BadRequestError

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # noqa: S105 (an RFC 9110 token, not a secret)
# Unquoted values are read leniently up to the next ; or , (OHIF sends type=application/octet-stream).
_PARAM = re.compile(rf"\s*;\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;,\s]*)")
_TYPE = re.compile(rf"\s*({_TOKEN})/({_TOKEN})")


@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def essence(self) -> str:
        return f"{self.type}/{self.subtype}"

    def covers(self, media_type: str) -> bool:
        """True when this range (e.g. ``*/*``, ``multipart/*``) includes ``media_type``."""
        t, _, s = media_type.partition("/")
        return self.type in ("*", t) and self.subtype in ("*", s)


def parse_media_type(text: str) -> MediaRange:
    """Parse one media type with parameters; raises BadRequestError when malformed."""
    ranges = _parse_list(text)
    if len(ranges) != 1:
        raise BadRequestError("malformed media type")
    return ranges[0]


def parse_accept(header: str | None) -> list[MediaRange]:
    """Parse an Accept header, best first (by q, then order); an absent header yields ``*/*``."""
    if header is None or not header.strip():
        return [MediaRange("*", "*")]
    ranges = [r for r in _parse_list(header) if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def _parse_list(text: str) -> list[MediaRange]:
    out: list[MediaRange] = []
    pos = 0
    while pos < len(text):
        m = _TYPE.match(text, pos)
        if m is None:
            raise BadRequestError("malformed media type in header")
        params: dict[str, str] = {}
        pos = m.end()
        while True:
            p = _PARAM.match(text, pos)
            if p is None:
                break
            value = p.group(2).strip()
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        q = 1.0
        if "q" in params:
            try:
                q = float(params.pop("q"))
            except ValueError as exc:
                raise BadRequestError("malformed q value in Accept header") from exc
            if not 0.0 <= q <= 1.0:
                raise BadRequestError("q value in Accept header must be between 0 and 1")
        out.append(MediaRange(m.group(1).lower(), m.group(2).lower(), params, q))
        rest = text[pos:].lstrip()
        if not rest:
            break
        if not rest.startswith(","):
            raise BadRequestError("malformed media type in header")
        pos = len(text) - len(rest) + 1
    return out
