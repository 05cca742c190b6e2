"""DICOM unique identifier (UID) checks, PS3.5 section 9.1."""

from __future__ import annotations

__all__ = ["MAX_UID_LENGTH", "is_valid_uid", "uid_problem", "validate_uid"]

MAX_UID_LENGTH = 64
"""Longest UID the standard allows, in characters."""

_DIGITS = frozenset("0123456789")


def uid_problem(s: str) -> str | None:
    """Return why `s` is not a valid DICOM UID (a phrase without the value), or None when it is valid."""
    if not s:
        return "is empty"
    if len(s) > MAX_UID_LENGTH:
        return f"is longer than {MAX_UID_LENGTH} characters"
    for component in s.split("."):
        if not component:
            return "has an empty component (a leading, trailing or doubled dot)"
        if not _DIGITS.issuperset(component):
            return "may contain only digits and dots"
        if len(component) > 1 and component[0] == "0":
            return "has a component with a leading zero"
    return None


def is_valid_uid(s: str) -> bool:
    """Return True when `s` is a well-formed DICOM UID.

    A UID is 1 to 64 characters of digits and dots; every dot-separated component is non-empty and a
    multi-digit component does not start with ``0``.
    """
    return uid_problem(s) is None


def validate_uid(s: str, name: str) -> str:
    """Return `s` unchanged when it is a well-formed DICOM UID.

    Parameters
    ----------
    s:
        The candidate UID.
    name:
        What the UID is, for the message (e.g. ``"Study Instance UID"``).

    Raises
    ------
    ValueError
        With a message naming `name` and the rule broken; the value itself is not repeated.
    """
    problem = uid_problem(s)
    if problem is not None:
        raise ValueError(f"{name} is not a valid DICOM UID: it {problem}")
    return s
