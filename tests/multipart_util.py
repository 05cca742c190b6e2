"""Building and splitting multipart/related bodies in tests (independent of the server's parser)."""

from __future__ import annotations

import email.parser
import email.policy
import uuid


def encode(
    parts: list[bytes], boundary: str | None = None, part_type: str = "application/dicom"
) -> tuple[bytes, str]:
    """Return (body, content_type) of a multipart/related message with the given parts."""
    boundary = boundary or uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{part_type}"; boundary={boundary}'


def decode(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart response into (headers, payload) pairs using the stdlib email parser."""
    raw = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    out = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append(({k.lower(): str(v) for k, v in part.items()}, payload))
    return out
