"""Tests for DICOM UID validation."""

from __future__ import annotations

import pytest

from pacslib.dicom_uids import MAX_UID_LENGTH, is_valid_uid, uid_problem, validate_uid

VALID = [
    "0",
    "1",
    "1.2",
    "0.1.0",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * (MAX_UID_LENGTH - 2),
]

INVALID = [
    ("", "is empty"),
    (".1.2", "empty component"),
    ("1.2.", "empty component"),
    ("1..2", "empty component"),
    ("1.02.3", "leading zero"),
    ("00", "leading zero"),
    ("1.2.a", "only digits and dots"),
    ("1.2 ", "only digits and dots"),
    ("1.2\x00", "only digits and dots"),
    ("1.2.-3", "only digits and dots"),
    ("1.\u0663", "only digits and dots"),  # ARABIC-INDIC DIGIT THREE is a digit to str.isdigit, not to DICOM
    ("1." + "2" * (MAX_UID_LENGTH - 1), "longer than 64"),
]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids_are_accepted(uid: str) -> None:
    assert is_valid_uid(uid)
    assert uid_problem(uid) is None
    assert validate_uid(uid, "Study Instance UID") == uid


@pytest.mark.parametrize(("uid", "reason"), INVALID)
def test_invalid_uids_are_rejected_with_a_reason(uid: str, reason: str) -> None:
    assert not is_valid_uid(uid)
    problem = uid_problem(uid)
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize(("uid", "reason"), INVALID)
def test_validate_uid_names_the_attribute_but_not_the_value(uid: str, reason: str) -> None:
    with pytest.raises(ValueError, match="Series Instance UID") as info:
        validate_uid(uid, "Series Instance UID")
    message = str(info.value)
    assert reason in message
    if uid.strip():
        assert uid not in message


def test_longest_valid_uid_is_64_characters() -> None:
    assert MAX_UID_LENGTH == 64
    assert is_valid_uid("9" * 64)
    assert not is_valid_uid("9" * 65)
