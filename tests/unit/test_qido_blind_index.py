"""Blind-index tokens: exact coverings, agreement with the reference matching, and the index key."""

from __future__ import annotations

import datetime as dt
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacslib.keyring import Keyring
from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.blind_index import (
    INDEX_KEY_CONTEXT,
    INDEX_KEY_NAME,
    MAX_PREFIX,
    BlindIndex,
    date_cover,
    date_terms,
    load_index,
    rewrap_index_key,
    time_cover,
    time_terms,
)
from services.storage.ports import Level, TokenClause, WrappedKey
from services.storage.qido_attributes import KEYS_BY_NAME, keys_at, tag_of
from services.storage.query_model import parse_condition, values_at

INDEX = BlindIndex(b"\x01" * 32)


def key(keyword: str) -> Any:
    return KEYS_BY_NAME[tag_of(keyword)]


def days(first: dt.date, last: dt.date) -> Iterator[dt.date]:
    d = first
    while d <= last:
        yield d
        d += dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (dt.date(2026, 1, 1), dt.date(2026, 1, 1)),
        (dt.date(2026, 1, 5), dt.date(2026, 3, 20)),
        (dt.date(2023, 12, 31), dt.date(2024, 3, 1)),  # leap year February
        (dt.date(1999, 2, 1), dt.date(2041, 11, 30)),
        (dt.date(2010, 1, 1), dt.date(2019, 12, 31)),  # exactly one decade
    ],
)
def test_date_cover_is_exact(low: dt.date, high: dt.date) -> None:
    cover = set(date_cover(low, high))
    for d in days(low - dt.timedelta(days=400), high + dt.timedelta(days=400)):
        assert bool(cover & set(date_terms(d))) is (low <= d <= high), d


def test_date_cover_random_ranges_are_exact_and_small() -> None:
    rng = random.Random(7)
    for _ in range(40):
        low = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randrange(0, 15000))
        high = low + dt.timedelta(days=rng.randrange(0, 3000))
        cover = set(date_cover(low, high))
        window = list(days(low - dt.timedelta(days=60), high + dt.timedelta(days=60)))
        for d in rng.sample(window, min(200, len(window))):
            assert bool(cover & set(date_terms(d))) is (low <= d <= high)
    # The widest open-ended range stays a small IN list.
    assert len(date_cover(dt.date(1800, 1, 1), dt.date(2026, 6, 17))) < 80
    assert len(date_cover(dt.date(2026, 6, 17), dt.date(2199, 12, 31))) < 80


def test_time_cover_is_exact() -> None:
    rng = random.Random(11)
    for low, high in [
        (0, 86399),
        (30600, 32459),
        (30615, 30615),
        *[(a, a + rng.randrange(0, 40000)) for a in (rng.randrange(0, 46000) for _ in range(15))],
    ]:
        cover = set(time_cover(low, high))
        assert len(cover) <= 23 + 2 * 59 + 2 * 59
        for s in [
            *range(max(0, low - 70), min(86399, low + 70)),
            *range(max(0, high - 70), min(86399, high + 70)),
            *rng.sample(range(86400), 300),
        ]:
            assert bool(cover & set(time_terms(s))) is (low <= s <= high), (low, high, s)


def test_tokens_depend_on_key_attribute_kind_and_value() -> None:
    other = BlindIndex(b"\x02" * 32)
    t = INDEX.token("00100010", "eq", "DOE")
    assert t == INDEX.token("00100010", "eq", "DOE")
    assert -(2**63) <= t < 2**63
    assert (
        len(
            {
                t,
                other.token("00100010", "eq", "DOE"),
                INDEX.token("00100020", "eq", "DOE"),
                INDEX.token("00100010", "pre", "DOE"),
                INDEX.token("00100010", "eq", "DOF"),
            }
        )
        == 5
    )
    assert "\x01" not in repr(INDEX)
    with pytest.raises(ValueError, match="32 bytes"):
        BlindIndex(b"short")


def row_tokens(doc: dict[str, Any], level: Level) -> set[int]:
    tokens = INDEX.instance_tokens(
        doc,
        study_uid="1.2",
        series_uid="1.2.3",
        sop_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        owner_org=None,
    )
    return set(
        {Level.STUDY: tokens.study, Level.SERIES: tokens.series, Level.INSTANCE: tokens.instance}[level]
    )


def selected(clauses: tuple[TokenClause, ...], tokens: set[int]) -> bool:
    return all(c.tokens & tokens for c in clauses)


NAMES = [
    "DOE^JOHN",
    "Doe^Jane",
    "DÖRING^Paul",
    "O'BRIEN^PAT",
    "SMITH-JONES^ANNA MARIA",
    "VAN DER BERG^JAN",
    "Y",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ^LONG",
]
NAME_QUERIES = [
    "DOE^JOHN",
    "doe*",
    "DO*",
    "D*",
    "SMITH-JONES*",
    "van der*",
    "ABCDEFGHIJKLMNOPQ*",
    "ABCDEFGHIJKLMNOP*",
    "*OE*",
    "D?E*",
    "Y",
    "y*",
]
FUZZY_QUERIES = [
    "jo",
    "jan van",
    "maria",
    "brien",
    "obrien",
    "doring paul",
    "abcdefghijklmnopqrst",
    "ja*",
    "j?n",
]


@pytest.mark.parametrize("value", NAMES)
def test_name_tokens_agree_with_the_reference_matching(value: str) -> None:
    doc = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": value}]}}
    tokens = row_tokens(doc, Level.STUDY)
    for query, fuzzy in [(q, False) for q in NAME_QUERIES] + [(q, True) for q in FUZZY_QUERIES]:
        condition = parse_condition(key("PatientName"), query, fuzzy)
        assert condition is not None
        compiled = INDEX.compile(condition)
        truth = condition.matches(values_at(doc, condition.key.path))
        hit = selected(compiled.clauses, tokens)
        if compiled.exact:
            assert hit is truth, (query, fuzzy)
        else:
            assert hit or not truth, (query, fuzzy)  # a narrowing never loses a match


@pytest.mark.parametrize(
    ("keyword", "value", "queries"),
    [
        (
            "PatientID",
            "PID-0042",
            ["PID-0042", "pid-0042", "PID*", "PID-00?2", "*42", "PID-0042\\X", "Q*\\PID*"],
        ),
        ("AccessionNumber", "A" * 20, ["A" * 20, "A" * 16 + "*", "A" * 17 + "*", "A" * 21]),
        ("StudyDate", "20260115", ["20260115", "20260101-20260131", "20260116-", "-20260114", "19000101-"]),
        ("StudyTime", "083015.25", ["0830", "083015", "083016-", "08-0830", "0831-", "083015.3-"]),
        ("PatientSex", "F", ["F", "M", "F\\M", "?"]),
        ("StudyInstanceUID", "1.2", ["1.2", "1.2\\1.3", "1.3"]),
    ],
)
def test_study_tokens_agree_with_the_reference_matching(keyword: str, value: str, queries: list[str]) -> None:
    k = key(keyword)
    vr = {"StudyDate": "DA", "StudyTime": "TM", "StudyInstanceUID": "UI"}.get(keyword, "LO")
    doc = {k.tag: {"vr": vr, "Value": [value]}}
    tokens = row_tokens(doc, Level.STUDY)
    for query in queries:
        condition = parse_condition(k, query, False)
        assert condition is not None
        compiled = INDEX.compile(condition)
        truth = condition.matches(values_at(doc, k.path))
        if compiled.exact:
            assert selected(compiled.clauses, tokens) is truth, query
        else:
            assert selected(compiled.clauses, tokens) or not truth, query


def test_compiled_exactness() -> None:
    def compiled(keyword: str, value: str, fuzzy: bool = False) -> Any:
        condition = parse_condition(key(keyword), value, fuzzy)
        assert condition is not None
        return INDEX.compile(condition)

    assert compiled("PatientID", "X" * MAX_PREFIX + "*").exact
    assert not compiled("PatientID", "X" * (MAX_PREFIX + 1) + "*").exact
    assert compiled("PatientID", "*X").clauses == ()
    assert not compiled("PatientID", "*X").exact
    assert len(compiled("PatientName", "joh do", fuzzy=True).clauses) == 2
    assert not compiled("PatientName", "*oh do", fuzzy=True).exact
    assert compiled("StudyDate", "20260101-").exact
    assert not compiled("StudyTime", "101010.5-").exact


def test_instance_tokens_by_level() -> None:
    doc = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]},
        "00080060": {"vr": "CS", "Value": ["MR"]},
        "00200013": {"vr": "IS", "Value": [7]},
    }
    tokens = INDEX.instance_tokens(
        doc,
        study_uid="1.2",
        series_uid="1.2.3",
        sop_uid="1.2.3.4",
        sop_class_uid="1.2.840.1",
        owner_org="org-a",
    )
    name_token = INDEX.token("00100010", "eq", "DOE^JOHN")
    modality = INDEX.token("00080060", "eq", "MR")
    in_study = INDEX.token("00080061", "eq", "MR")
    number = INDEX.token("00200013", "eq", "7")
    assert name_token in tokens.study
    assert name_token not in tokens.series | tokens.instance  # upper levels are matched on their own rows
    assert modality in tokens.series
    assert in_study in tokens.study_aggregate
    assert in_study in tokens.study
    assert number in tokens.instance
    assert INDEX.uid_token(key("StudyInstanceUID"), "1.2") in tokens.study & tokens.series & tokens.instance
    assert tokens.owner == INDEX.owner_token("org-a")
    assert tokens.modality == "MR"


def test_every_matching_key_of_a_level_is_indexed() -> None:
    for level in Level:
        for k in keys_at(level):
            assert k.level is level
    assert {k.keyword for k in keys_at(Level.STUDY)} >= {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "StudyID",
    }


async def test_index_key_is_created_once_wrapped_and_rewrapped(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keyring.json")
    store = SqliteMetadataStore(tmp_path / "state" / "m.db")
    await store.init()
    try:
        first = await load_index(store, keyring)
        stored = await store.get_index_key(INDEX_KEY_NAME)
        assert stored is not None
        assert stored.kek_id == keyring.active_id
        again = await load_index(store, keyring)
        assert again.token("a", "eq", "b") == first.token("a", "eq", "b")
        plain = keyring.unwrap(stored.kek_id, stored.wrapped, INDEX_KEY_CONTEXT)
        assert plain not in (tmp_path / "state" / "m.db").read_bytes()

        assert await rewrap_index_key(store, keyring) == 0  # already wrapped by the active KEK
        keyring.rotate()
        assert await rewrap_index_key(store, keyring) == 1
        rewrapped = await store.get_index_key(INDEX_KEY_NAME)
        assert rewrapped is not None
        assert rewrapped.kek_id == keyring.active_id
        assert (await load_index(store, keyring)).token("a", "eq", "b") == first.token("a", "eq", "b")
    finally:
        await store.close()


async def test_a_stored_index_key_wins_over_a_new_one(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keyring.json")
    store = SqliteMetadataStore(tmp_path / "m.db")
    await store.init()
    try:
        kek_id, wrapped = keyring.wrap(os.urandom(32), INDEX_KEY_CONTEXT)
        await store.add_index_key(INDEX_KEY_NAME, WrappedKey(kek_id, wrapped))
        index = await load_index(store, keyring)
        expected = BlindIndex(keyring.unwrap(kek_id, wrapped, INDEX_KEY_CONTEXT))
        assert index.token("x", "eq", "y") == expected.token("x", "eq", "y")
    finally:
        await store.close()
