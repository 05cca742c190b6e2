"""Adapters of the storage ports: filesystem and S3 object stores, SQLite and MongoDB metadata stores."""

from __future__ import annotations

import re

_KEY_PART = re.compile(r"[A-Za-z0-9._-]+")
MAX_KEY_LENGTH = 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ValueError.

    A key is a relative path of ``/``-separated parts made of ``A-Z a-z 0-9 . _ -``, without empty,
    ``.`` or ``..`` parts. Both object stores accept exactly the same keys, so they stay interchangeable.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"an object key must have 1 to {MAX_KEY_LENGTH} characters")
    for part in key.split("/"):
        if not is_key_part(part):
            raise ValueError(
                f"invalid object key {key!r}: use '/'-separated parts of letters, digits, '.', '_' "
                "and '-', without empty, '.' or '..' parts"
            )
    return key


def is_key_part(name: str) -> bool:
    """Whether ``name`` may be one ``/``-separated part of a key."""
    return name not in (".", "..") and _KEY_PART.fullmatch(name) is not None


def check_range(start: int, end: int | None) -> None:
    """Raise ValueError unless ``[start, end)`` is a valid byte range (``end=None``: open-ended)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")
