"""The QIDO-RS query model: parsing request parameters and the reference matching semantics."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pacslib.errors import BadRequestError
from services.storage.ports import Level
from services.storage.qido_attributes import KEYS_BY_NAME, tag_of
from services.storage.query_model import (
    AccessScope,
    DateCondition,
    DateTimeCondition,
    NameCondition,
    NumberCondition,
    Pattern,
    QidoQuery,
    TextCondition,
    TimeCondition,
    UidCondition,
    normalize_name,
    parse_condition,
    parse_query,
    parse_time,
)


def parse(params: dict[str, str] | list[tuple[str, str]], level: Level = Level.STUDY, **kw: Any) -> QidoQuery:
    items = list(params.items()) if isinstance(params, dict) else params
    return parse_query(level, items, **kw)


def only(query: QidoQuery) -> Any:
    (condition,) = query.conditions
    return condition


def key(keyword: str) -> Any:
    return KEYS_BY_NAME[".".join(tag_of(k) for k in keyword.split("."))]


def pn(alphabetic: str, **groups: str) -> dict[str, str]:
    return {"Alphabetic": alphabetic, **groups}


# -- parsing ---------------------------------------------------------------------------------------
def test_defaults() -> None:
    q = parse({})
    assert (q.level, q.limit, q.offset, q.fuzzy, q.include_all, q.conditions) == (
        Level.STUDY,
        100,
        0,
        False,
        False,
        (),
    )
    assert not q.limit_lowered


def test_keyword_and_tag_name_the_same_key() -> None:
    by_keyword = only(parse({"PatientID": "PID1"}))
    by_tag = only(parse({"00100020": "PID1"}))
    assert by_keyword == by_tag
    assert isinstance(by_keyword, TextCondition)
    assert only(parse({"0020000d": "1.2.3"})) == only(parse({"StudyInstanceUID": "1.2.3"}))


def test_nested_sequence_keys() -> None:
    a = only(parse({"RequestAttributesSequence.ScheduledProcedureStepID": "SPS1"}, Level.SERIES))
    b = only(parse({"00400275.00400009": "SPS1"}, Level.SERIES))
    assert a == b
    assert a.key.path == ("00400275", "00400009")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"Foo": "1"}, "unknown query parameter 'Foo'"),
        ({"0010001": "1"}, "unknown query parameter '0010001'"),
        ({"Rows": "512"}, "'Rows' is not a supported matching key"),
        ({"SOPInstanceUID": "1.2"}, "instance-level attribute"),
        ({"Modality": "CT"}, "series-level attribute"),
        ([("PatientID", "a"), ("00100020", "b")], "PatientID is given more than once"),
        ({"limit": "ten"}, "'limit' must be a non-negative integer"),
        ({"limit": "-1"}, "'limit' must be a non-negative integer"),
        ({"limit": "0"}, "'limit' must be at least 1"),
        ({"offset": "1.5"}, "'offset' must be a non-negative integer"),
        ([("limit", "1"), ("limit", "2")], "'limit' is given more than once"),
        ({"fuzzymatching": "yes"}, "'fuzzymatching' must be true or false"),
        ({"includefield": "NoSuchKeyword"}, "unknown attribute in includefield 'NoSuchKeyword'"),
        ({"includefield": "PatientName,,StudyDate"}, "'includefield' has an empty attribute"),
        ({"StudyDate": "2026-01-01"}, "StudyDate must be"),
        ({"StudyDate": "20261301"}, "StudyDate must be a date YYYYMMDD"),
        ({"StudyDate": "20260102-20260101"}, "the range of StudyDate ends before it starts"),
        ({"StudyDate": "-"}, "the range of StudyDate must be"),
        ({"StudyDate": "20260101-20260102-20260103"}, "the range of StudyDate must be"),
        ({"StudyTime": "25"}, "StudyTime must be a time"),
        ({"StudyTime": "10:30"}, "StudyTime must be a time"),
        ({"StudyInstanceUID": "1.2.*"}, "StudyInstanceUID must be a UID"),
        ({"StudyInstanceUID": "1.2\\\\1.3"}, "value list of StudyInstanceUID"),
        ({"PatientName": "DOE^JOHN=ドウ"}, "component groups"),
        ({"PatientName": "X" * 1025}, "PatientName is too long"),
    ],
)
def test_malformed_requests_name_the_problem(params: Any, message: str) -> None:
    with pytest.raises(BadRequestError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse(params)


def test_datetime_with_time_zone_is_refused() -> None:
    with pytest.raises(BadRequestError, match="time zone"):
        parse({"AcquisitionDateTime": "20260101101010+0100"}, Level.INSTANCE)


def test_number_must_be_an_integer() -> None:
    with pytest.raises(BadRequestError, match="must be an integer"):
        parse({"SeriesNumber": "1*"}, Level.SERIES)


def test_invalid_path_uids() -> None:
    with pytest.raises(BadRequestError, match="study UID in the path"):
        parse({}, Level.SERIES, study_uid="not-a-uid")
    with pytest.raises(BadRequestError, match="series UID in the path"):
        parse({}, Level.INSTANCE, study_uid="1.2", series_uid="1.2.x")


def test_paging_and_limit_lowering() -> None:
    q = parse({"limit": "25", "offset": "50"})
    assert (q.limit, q.offset, q.limit_lowered) == (25, 50, False)
    high = parse({"limit": "5000"}, max_limit=1000)
    assert (high.limit, high.limit_lowered) == (1000, True)


def test_includefield_lists_repeats_all_and_levels() -> None:
    q = parse([("includefield", "00081030,PatientAge"), ("includefield", "00100040")])
    assert q.include == {"00081030", tag_of("PatientAge"), "00100040"}
    assert parse({"includefield": "all"}).include_all
    # Series and instance attributes are never returned for studies (PS3.18 10.6.3.3.1).
    assert parse({"includefield": "Modality,Rows"}).include == frozenset()
    assert parse({"includefield": "Modality,Rows"}, Level.INSTANCE).include == {"00080060", "00280010"}


def test_universal_matching_becomes_an_included_attribute() -> None:
    q = parse({"PatientName": "", "StudyDescription": "*"})
    assert q.conditions == ()
    assert q.include == {"00100010", "00081030"}


def test_fuzzymatching_and_uid_lists() -> None:
    q = parse({"fuzzymatching": "TRUE", "PatientName": "joh do"})
    condition = only(q)
    assert isinstance(condition, NameCondition)
    assert condition.fuzzy
    assert [w.text for w in condition.words] == ["JOH", "DO"]
    uids = only(parse({"StudyInstanceUID": "1.2.3\\1.2.4"}))
    assert uids == UidCondition(key("StudyInstanceUID"), frozenset({"1.2.3", "1.2.4"}))


def test_matched_tags_and_upper_level_keys() -> None:
    q = parse({"PatientName": "DOE*", "Modality": "CT"}, Level.INSTANCE)
    assert q.matched_tags == {"00100010", "00080060"}
    assert [c.key.keyword for c in q.conditions_at(Level.SERIES)] == ["Modality"]


def test_ranges_parse_open_ends() -> None:
    closed = only(parse({"StudyDate": "20260101-20260131"}))
    assert closed == DateCondition(key("StudyDate"), dt.date(2026, 1, 1), dt.date(2026, 1, 31))
    assert only(parse({"StudyDate": "-20260131"})).low == dt.date.min
    assert only(parse({"StudyDate": "20260101-"})).high == dt.date.max
    single = only(parse({"StudyTime": "10"}))
    assert (single.low, single.high) == (36000.0, pytest.approx(39599.999999))
    minute = only(parse({"StudyTime": "0830-0900"}))
    assert (minute.low, minute.high, minute.fractional) == (30600.0, pytest.approx(32459.999999), False)
    assert only(parse({"StudyTime": "083015.5-"})).fractional
    whole_days = only(parse({"AcquisitionDateTime": "20260101-20260102"}, Level.INSTANCE))
    assert isinstance(whole_days, DateTimeCondition)
    assert whole_days.whole_days
    assert not only(parse({"AcquisitionDateTime": "2026010110-"}, Level.INSTANCE)).whole_days


def test_access_scope_takes_any_sets() -> None:
    scope = AccessScope(orgs={"a"}, study_uids=["1.2"])  # type: ignore[arg-type]
    assert scope.orgs == frozenset({"a"})
    assert scope.study_uids == frozenset({"1.2"})
    assert not AccessScope().all


# -- matching semantics ----------------------------------------------------------------------------
def name(value: str, fuzzy: bool = False) -> NameCondition:
    condition = parse_condition(key("PatientName"), value, fuzzy)
    assert isinstance(condition, NameCondition)
    return condition


@pytest.mark.parametrize(
    ("query", "fuzzy", "value", "expected"),
    [
        ("DOE^JOHN", False, pn("DOE^JOHN"), True),
        ("doe^john", False, pn("Doe^John"), True),  # case-insensitive for PN
        ("DOE^JOSE", False, pn("Doe^José"), True),  # accent-insensitive
        ("DOE^JOHN", False, pn("DOE^JOHN^^^"), True),  # empty trailing components
        ("DOE", False, pn("DOE^JOHN"), False),  # single value: the whole name
        ("DOE*", False, pn("DOE^JOHN"), True),
        ("DOE*", False, pn("DOERING^PAUL"), True),
        ("*OE*", False, pn("DOE^JOHN"), True),
        ("D?E^*", False, pn("DOE^JOHN"), True),
        ("*JOHN", False, pn("DOE^JOHN"), True),
        ("*JOHN", False, pn("DOE^JOHNNY"), False),
        ("JOHN*", False, pn("DOE^JOHN"), False),  # not fuzzy: no word matching
        ("JOHN*", True, pn("DOE^JOHN"), True),
        ("joh", True, pn("DOE^JOHN"), True),  # fuzzy: word prefix
        ("joh do", True, pn("DOE^JOHN"), True),  # every word must start a name word
        ("joh smi", True, pn("DOE^JOHN"), False),
        ("ohn", True, pn("DOE^JOHN"), False),  # a prefix, not a substring
        ("obrien", True, pn("O'BRIEN^PAT"), True),
        ("jose", True, pn("García^José"), True),
        ("やまだ", False, pn("Yamada^Tarou", Ideographic="山田^太郎", Phonetic="やまだ"), True),
        ("山田*", False, pn("Yamada^Tarou", Ideographic="山田^太郎"), True),
    ],
)
def test_person_name_matching(query: str, fuzzy: bool, value: Any, expected: bool) -> None:
    assert name(query, fuzzy).matches([value]) is expected


def test_text_matching_is_case_sensitive_and_lists_match_any() -> None:
    condition = parse_condition(key("PatientID"), "pid-1\\PID-2*", False)
    assert isinstance(condition, TextCondition)
    assert condition.matches(["PID-2X"])
    assert condition.matches(["pid-1"])
    assert not condition.matches(["PID-1"])
    assert not condition.matches([])
    modality = parse_condition(key("ModalitiesInStudy"), "CT\\MR", False)
    assert modality is not None
    assert modality.matches(["US", "MR"])


def test_number_matching_is_numeric() -> None:
    condition = parse_condition(key("SeriesNumber"), "01", False)
    assert condition == NumberCondition(key("SeriesNumber"), frozenset({1}))
    assert condition.matches([1])
    assert condition.matches(["1 "])
    assert not condition.matches([10, "x"])


@pytest.mark.parametrize(
    ("query", "value", "expected"),
    [
        ("20260105", "20260105", True),
        ("20260105", "20260106", False),
        ("20260101-20260131", "20260131", True),
        ("20260101-20260131", "20260201", False),
        ("-19491231", "18991231", True),
        ("20260101-", "21991231", True),
        ("20260101-", "2026.01.01", True),  # the retired dotted form, stored by old modalities
        ("20260101-", "garbage", False),
    ],
)
def test_date_matching(query: str, value: str, expected: bool) -> None:
    condition = parse_condition(key("StudyDate"), query, False)
    assert condition is not None
    assert condition.matches([value]) is expected


@pytest.mark.parametrize(
    ("query", "value", "expected"),
    [
        ("10", "1000", True),
        ("10", "105959.99", True),
        ("10", "11", False),
        ("0830-0900", "0900", True),
        ("0830-0900", "090059", True),  # a reduced-precision upper bound covers its whole minute
        ("0830-0900", "0901", False),
        ("083015-", "0830", False),  # 08:30:00 is before 08:30:15
        ("083015-", "08:30:16", True),  # the retired colon form
        ("-0800", "07", True),
        ("083015.5-", "083015.4", False),
    ],
)
def test_time_matching(query: str, value: str, expected: bool) -> None:
    condition = parse_condition(key("StudyTime"), query, False)
    assert isinstance(condition, TimeCondition)
    assert condition.matches([value]) is expected


@pytest.mark.parametrize(
    ("query", "value", "expected"),
    [
        ("2026", "20261231235959", True),
        ("202601-202602", "20260315", False),
        ("202601-202602", "20260229", False),  # not a date: ignored
        ("202601-202602", "20260228", True),
        ("20260101101010-", "20260101101009.999", False),
        ("20260101101010-", "20260101101010+0100", True),
        ("-2025", "2025", True),
    ],
)
def test_datetime_matching(query: str, value: str, expected: bool) -> None:
    condition = parse_condition(key("AcquisitionDateTime"), query, False)
    assert isinstance(condition, DateTimeCondition)
    assert condition.matches([value]) is expected


def test_patterns_and_values() -> None:
    assert Pattern.of("ABC*").is_prefix
    assert Pattern.of("ABC**").is_prefix
    assert not Pattern.of("ABC*D*").is_prefix
    assert not Pattern.of("A?C*").is_prefix
    assert Pattern.of("A?C*").lead == "A"
    assert Pattern.of("a.b*").matches("a.bc")
    assert not Pattern.of("a.b*").matches("axbc")  # regex characters are literal
    assert normalize_name("  Müller ^ Jürgen ^^") == "MULLER^JURGEN"
    assert parse_time("2460") is None
    assert parse_time("1010") is not None
