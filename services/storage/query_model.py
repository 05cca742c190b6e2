"""The QIDO-RS query model: request parameters parsed once into conditions (PS3.18 8.3.4, PS3.4 C.2.2.2).

A ``QidoQuery`` is independent of storage: ``blind_index.compile_condition`` turns each condition into
token clauses for the metadata adapters, and ``Condition.matches`` is the reference semantics, used to
check decrypted candidates when a condition cannot be answered by tokens alone.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError
from services.storage.ports import Level
from services.storage.qido_attributes import (
    KEYS_BY_NAME,
    MatchingKey,
    MatchKind,
    level_of,
    tag_of,
)

DEFAULT_LIMIT = 100
MAX_VALUE_LENGTH = 1024
MAX_LIST_VALUES = 500
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_WILDCARDS = frozenset("*?")
_LEVEL_NAMES = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}
_RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield"})


# -- values --------------------------------------------------------------------------------------
def normalize_name(text: str) -> str:
    """A person name as the index compares it: accents stripped, upper case, empty trailing parts dropped."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    upper = stripped.casefold().upper()
    parts = [p.strip() for p in upper.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


_WORD = re.compile(r"[^\W_]+")
_WORD_WITH_WILDCARDS = re.compile(r"(?:[^\W_]|[*?])+")


def name_words(normalized: str) -> list[str]:
    """The words of a normalized name (apostrophes and periods are dropped: O'BRIEN is OBRIEN)."""
    return _WORD.findall(normalized.replace("'", "").replace(".", ""))


def name_groups(value: Any) -> list[str]:
    """The normalized component groups (alphabetic, ideographic, phonetic) of a DICOM JSON PN value."""
    if isinstance(value, dict):
        texts = [value.get(g) for g in ("Alphabetic", "Ideographic", "Phonetic")]
    else:
        texts = [value]
    return [n for n in (normalize_name(t) for t in texts if isinstance(t, str)) if n]


def parse_date(text: str) -> dt.date | None:
    """A DA value (``YYYYMMDD``; the retired ``YYYY.MM.DD`` too), or None when it is not a date."""
    digits = text.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


@dataclass(frozen=True, slots=True)
class TimeValue:
    """A TM value: seconds since midnight (padded with zeros) and how many of HH, MM, SS it gave."""

    seconds: float
    parts: int
    fraction_digits: int

    def upper(self) -> float:
        """The last instant the value covers (``10`` covers 10:00:00 to 10:59:59.999999)."""
        if self.fraction_digits:
            return self.seconds + 10.0**-self.fraction_digits - 1e-6
        return self.seconds + {1: 3600.0, 2: 60.0, 3: 1.0}[self.parts] - 1e-6


def parse_time(text: str) -> TimeValue | None:
    """A TM value (``HH[MM[SS[.F{1,6}]]]``; the retired ``HH:MM:SS`` too), or None."""
    m = _TIME.fullmatch(text.strip().replace(":", ""))
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    if mm is None and ss is not None:
        return None
    hours, minutes, seconds = int(hh), int(mm or 0), int(ss or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    parts = 1 + (mm is not None) + (ss is not None)
    total = hours * 3600 + minutes * 60 + min(seconds, 59) + (float("0." + frac) if frac else 0.0)
    return TimeValue(total, parts, len(frac) if frac else 0)


_DATETIME = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")


@dataclass(frozen=True, slots=True)
class DateTimeValue:
    """A DT value as a naive date-time (padded with minimal values), its precision and its offset."""

    moment: dt.datetime
    parts: int  # 1 = year ... 6 = seconds, 7 = fraction
    fraction_digits: int
    offset: str | None

    def upper(self) -> dt.datetime:
        """The last instant the value covers (``2026`` covers the whole year)."""
        m = self.moment
        if self.parts == 1:
            end = dt.datetime(m.year + 1, 1, 1) if m.year < 9999 else dt.datetime.max
        elif self.parts == 2:
            end = dt.datetime(m.year + (m.month == 12), m.month % 12 + 1, 1)
        elif self.parts == 3:
            end = dt.datetime(m.year, m.month, m.day) + dt.timedelta(days=1)
        elif self.parts == 4:
            end = m + dt.timedelta(hours=1)
        elif self.parts == 5:
            end = m + dt.timedelta(minutes=1)
        elif self.parts == 6:
            end = m + dt.timedelta(seconds=1)
        else:
            end = m + dt.timedelta(microseconds=10 ** (6 - self.fraction_digits))
        return end - dt.timedelta(microseconds=1) if end != dt.datetime.max else end


def parse_datetime(text: str) -> DateTimeValue | None:
    """A DT value (``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``), or None."""
    m = _DATETIME.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, offset = m.groups()
    given = [year, month, day, hour, minute, second]
    parts = sum(1 for g in given if g is not None)
    if frac is not None and parts < 6:
        return None
    try:
        moment = dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),
            int((frac or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    return DateTimeValue(moment, parts + (frac is not None), len(frac) if frac else 0, offset)


def as_int(value: Any) -> int | None:
    """An IS value as an integer, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def values_at(doc: dict[str, Any], path: Sequence[str]) -> list[Any]:
    """The values of an attribute in a DICOM JSON document, following a sequence path through items."""
    element = doc.get(path[0])
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    if not isinstance(values, list):
        return []
    if len(path) == 1:
        return [v for v in values if v is not None]
    out: list[Any] = []
    for item in values:
        if isinstance(item, dict):
            out.extend(values_at(item, path[1:]))
    return out


# -- patterns ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pattern:
    """A DICOM matching string: literal, or with ``*`` (any run) and ``?`` (one character) wildcards."""

    text: str
    regex: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def of(cls, text: str) -> Pattern:
        parts = ["." if c == "?" else ".*" if c == "*" else re.escape(c) for c in text]
        return cls(text, re.compile("".join(parts), re.DOTALL))

    @property
    def has_wildcard(self) -> bool:
        return any(c in _WILDCARDS for c in self.text)

    @property
    def lead(self) -> str:
        """The literal text before the first wildcard."""
        for i, c in enumerate(self.text):
            if c in _WILDCARDS:
                return self.text[:i]
        return self.text

    @property
    def is_prefix(self) -> bool:
        """True for ``ABC*``: a literal followed by one trailing ``*`` (a prefix search)."""
        lead = self.lead
        return len(lead) > 0 and self.text[len(lead) :].strip("*") == "" and self.text != lead

    def matches(self, value: str) -> bool:
        """Whole-value match."""
        return self.regex.fullmatch(value) is not None

    def matches_start(self, value: str) -> bool:
        """Match at the start of ``value`` (fuzzy word-prefix matching)."""
        return self.regex.match(value) is not None


# -- conditions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Condition:
    """One matching key with its parsed value; ``matches`` is the reference semantics."""

    key: MatchingKey

    def matches(self, values: Sequence[Any]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UidCondition(Condition):
    """List of UID matching (PS3.4 C.2.2.2.2)."""

    uids: frozenset[str]

    def matches(self, values: Sequence[Any]) -> bool:
        return any(str(v) in self.uids for v in values)


@dataclass(frozen=True, slots=True)
class TextCondition(Condition):
    """Single value or wildcard matching, case-sensitive; a backslash list matches any of its values."""

    patterns: tuple[Pattern, ...]

    def matches(self, values: Sequence[Any]) -> bool:
        return any(p.matches(str(v)) for v in values if not isinstance(v, dict) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class NumberCondition(Condition):
    """Integer string (IS) matching by numeric value."""

    numbers: frozenset[int]

    def matches(self, values: Sequence[Any]) -> bool:
        return any(as_int(v) in self.numbers for v in values)


@dataclass(frozen=True, slots=True)
class NameCondition(Condition):
    """Person name matching, insensitive to case and accents (PS3.4 C.2.2.2.1 allows it for PN).

    Without fuzzy matching the whole name must match ``pattern``; with it every query word must
    start some word of the name (``joh do`` finds ``DOE^JOHN``).
    """

    pattern: Pattern
    fuzzy: bool
    words: tuple[Pattern, ...]

    def matches(self, values: Sequence[Any]) -> bool:
        for value in values:
            for group in name_groups(value):
                if not self.fuzzy:
                    if self.pattern.matches(group):
                        return True
                    continue
                words = name_words(group)
                if all(any(w.matches_start(word) for word in words) for w in self.words):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class DateCondition(Condition):
    """Single date or (open-ended) date range matching, inclusive."""

    low: dt.date
    high: dt.date

    def matches(self, values: Sequence[Any]) -> bool:
        for v in values:
            d = parse_date(str(v))
            if d is not None and self.low <= d <= self.high:
                return True
        return False


@dataclass(frozen=True, slots=True)
class TimeCondition(Condition):
    """Single time or (open-ended) time range matching, inclusive, in seconds since midnight."""

    low: float
    high: float
    fractional: bool  # a bound has fractional seconds (tokens cannot be exact then)

    def matches(self, values: Sequence[Any]) -> bool:
        for v in values:
            t = parse_time(str(v))
            if t is not None and self.low <= t.seconds <= self.high:
                return True
        return False


@dataclass(frozen=True, slots=True)
class DateTimeCondition(Condition):
    """Single date-time or (open-ended) range matching, inclusive; time zone offsets are not applied."""

    low: dt.datetime
    high: dt.datetime

    @property
    def whole_days(self) -> bool:
        """True when both bounds fall on day boundaries (the date tokens then answer exactly)."""
        return self.low.time() == dt.time.min and self.high.time() == dt.time.max

    def matches(self, values: Sequence[Any]) -> bool:
        for v in values:
            d = parse_datetime(str(v))
            if d is not None and self.low <= d.moment <= self.high:
                return True
        return False


# -- the query -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessScope:
    """Which studies a search may see: everything, or the studies of some organizations plus some studies.

    Compiled into the search itself, so a study outside the scope is never returned, counted or hinted
    at. The HTTP layer passes ``AccessScope(all=True)`` until authentication lands.
    """

    all: bool = False
    orgs: AbstractSet[str] = frozenset()
    study_uids: AbstractSet[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "orgs", frozenset(self.orgs))
        object.__setattr__(self, "study_uids", frozenset(self.study_uids))


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """A parsed QIDO-RS request: what to search, how to match, what to return, which page."""

    level: Level
    study_uid: str | None = None
    series_uid: str | None = None
    conditions: tuple[Condition, ...] = ()
    include: frozenset[str] = frozenset()
    include_all: bool = False
    fuzzy: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    limit_lowered: bool = False

    def conditions_at(self, level: Level) -> tuple[Condition, ...]:
        """The conditions on attributes of ``level``."""
        return tuple(c for c in self.conditions if c.key.level is level)

    @property
    def matched_tags(self) -> frozenset[str]:
        """Top-level tags of every matching key used (they are returned with the results)."""
        return frozenset(c.key.tag for c in self.conditions)


def _resolve_tag(part: str) -> str | None:
    if _TAG.fullmatch(part):
        return part.upper()
    try:
        return tag_of(part)
    except KeyError:
        return None


def _quoted(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:61] + "...")


def _attribute_path(name: str, what: str) -> tuple[str, ...]:
    parts = name.split(".")
    tags = [_resolve_tag(p) for p in parts]
    if not all(tags):
        raise BadRequestError(
            f"unknown {what} {_quoted(name)}: use a DICOM keyword (PatientName) or a tag (00100010)"
        )
    return tuple(t for t in tags if t is not None)


def parse_query(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    max_limit: int = 1000,
) -> QidoQuery:
    """Parse the (already percent-decoded) query parameters of a QIDO-RS request.

    Raises BadRequestError naming the parameter for anything unknown or malformed.
    """
    for what, uid in (("study", study_uid), ("series", series_uid)):
        if uid is not None and not is_valid_uid(uid):
            raise BadRequestError(f"the {what} UID in the path is not a valid UID")
    limit: int | None = None
    offset = 0
    fuzzy = False
    include: set[str] = set()
    include_all = False
    raw: dict[str, tuple[MatchingKey, str]] = {}
    seen_special: set[str] = set()
    for name, value in params:
        if name in _RESERVED:
            if name != "includefield" and name in seen_special:
                raise BadRequestError(f"query parameter {name!r} is given more than once")
            seen_special.add(name)
        if name == "limit":
            limit = _non_negative(name, value)
            if limit == 0:
                raise BadRequestError("query parameter 'limit' must be at least 1")
        elif name == "offset":
            offset = _non_negative(name, value)
        elif name == "fuzzymatching":
            if value.strip().lower() not in ("true", "false"):
                raise BadRequestError("query parameter 'fuzzymatching' must be true or false")
            fuzzy = value.strip().lower() == "true"
        elif name == "includefield":
            for item in (i.strip() for i in value.split(",")):
                if not item:
                    raise BadRequestError("query parameter 'includefield' has an empty attribute")
                if item.lower() == "all":
                    include_all = True
                else:
                    include.add(_attribute_path(item, "attribute in includefield")[0])
        else:
            path = _attribute_path(name, "query parameter")
            key = KEYS_BY_NAME.get(".".join(path))
            if key is None:
                raise BadRequestError(
                    f"{_quoted(name)} is not a supported matching key (docs/qido.md lists them)"
                )
            if key.level > level:
                raise BadRequestError(
                    f"{key.keyword} is a {key.level.name.lower()}-level attribute: it cannot be matched "
                    f"when searching {_LEVEL_NAMES[level]}"
                )
            if key.name in raw:
                raise BadRequestError(f"matching key {key.keyword} is given more than once")
            if len(value) > MAX_VALUE_LENGTH:
                raise BadRequestError(f"the value of {key.keyword} is too long")
            raw[key.name] = (key, value.strip())
    conditions: list[Condition] = []
    for key, value in raw.values():
        condition = parse_condition(key, value, fuzzy)
        if condition is None:
            include.add(key.tag)  # universal matching: return the attribute
        else:
            conditions.append(condition)
    lowered = limit is not None and limit > max_limit
    return QidoQuery(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        conditions=tuple(conditions),
        include=frozenset(t for t in include if level_of(t) <= level),
        include_all=include_all,
        fuzzy=fuzzy,
        limit=min(limit if limit is not None else DEFAULT_LIMIT, max_limit),
        offset=offset,
        limit_lowered=lowered,
    )


def _non_negative(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        raise BadRequestError(f"query parameter {name!r} must be a non-negative integer")
    return int(text)


def parse_condition(key: MatchingKey, value: str, fuzzy: bool) -> Condition | None:
    """The condition of one matching key; None for universal matching (empty value or ``*``)."""
    if value == "" or (value.strip("*") == "" and key.kind is not MatchKind.UID):
        return None
    kind = key.kind
    if kind is MatchKind.UID:
        return UidCondition(key, frozenset(_uid_list(key, value)))
    if kind is MatchKind.NUMBER:
        numbers: set[int] = set()
        for item in _list(key, value):
            n = as_int(item)
            if n is None:
                raise BadRequestError(f"the value of {key.keyword} must be an integer (or a list of them)")
            numbers.add(n)
        return NumberCondition(key, frozenset(numbers))
    if kind is MatchKind.NAME:
        if "=" in value or "\\" in value:
            raise BadRequestError(
                f"{key.keyword}: component groups ('=') and lists ('\\') are not supported in name queries"
            )
        normalized = normalize_name(value)
        bare = normalized.replace("'", "").replace(".", "")
        words = tuple(Pattern.of(w) for w in _WORD_WITH_WILDCARDS.findall(bare))
        words = tuple(w for w in words if w.text.strip("*"))
        if fuzzy and not words:
            return None
        return NameCondition(key, Pattern.of(normalized), fuzzy, words)
    if kind is MatchKind.DATE:
        low, high = _range(key, value, _date_bound)
        return DateCondition(key, low[0] if low else dt.date.min, high[1] if high else dt.date.max)
    if kind is MatchKind.TIME:
        tlow, thigh = _range(key, value, _time_bound)
        return TimeCondition(
            key,
            tlow.seconds if tlow else 0.0,
            thigh.upper() if thigh else 86400.0,
            bool((tlow and tlow.fraction_digits) or (thigh and thigh.fraction_digits)),
        )
    if kind is MatchKind.DATETIME:
        dlow, dhigh = _range(key, value, _datetime_bound)
        return DateTimeCondition(
            key, dlow.moment if dlow else dt.datetime.min, dhigh.upper() if dhigh else dt.datetime.max
        )
    return TextCondition(key, tuple(Pattern.of(item) for item in _list(key, value)))


def _list(key: MatchingKey, value: str) -> list[str]:
    items = value.split("\\")
    if len(items) > MAX_LIST_VALUES or any(not i for i in items):
        raise BadRequestError(f"the value list of {key.keyword} is empty or too long")
    return items


def _uid_list(key: MatchingKey, value: str) -> list[str]:
    items = _list(key, value)
    for item in items:
        if not is_valid_uid(item):
            raise BadRequestError(f"the value of {key.keyword} must be a UID or a backslash-separated list")
    return items


def _date_bound(key: MatchingKey, text: str) -> tuple[dt.date, dt.date]:
    d = parse_date(text) if len(text) == 8 else None
    if d is None:
        raise BadRequestError(f"the value of {key.keyword} must be a date YYYYMMDD or a range of dates")
    return d, d


def _time_bound(key: MatchingKey, text: str) -> TimeValue:
    t = parse_time(text) if ":" not in text else None
    if t is None:
        raise BadRequestError(
            f"the value of {key.keyword} must be a time HHMMSS (HH, HHMM, HHMMSS.FFFFFF) or a range"
        )
    return t


def _datetime_bound(key: MatchingKey, text: str) -> DateTimeValue:
    d = parse_datetime(text)
    if d is None:
        raise BadRequestError(f"the value of {key.keyword} must be a date-time YYYYMMDDHHMMSS or a range")
    if d.offset is not None:
        raise BadRequestError(f"{key.keyword}: time zone offsets in date-time queries are not supported")
    return d


def _range(key: MatchingKey, value: str, bound: Any) -> tuple[Any, Any]:
    """Split ``a``, ``a-b``, ``-b`` or ``a-``; each bound parsed by ``bound``; None for an open end."""
    if "-" not in value:
        one = bound(key, value)
        return one, one
    first, _, second = value.partition("-")
    if "-" in second or (not first and not second):
        raise BadRequestError(f"the range of {key.keyword} must be 'from-to', '-to' or 'from-'")
    low = bound(key, first) if first else None
    high = bound(key, second) if second else None
    if low is not None and high is not None and _start(low) > _end(high):
        raise BadRequestError(f"the range of {key.keyword} ends before it starts")
    return low, high


def _start(bound: Any) -> Any:
    if isinstance(bound, tuple):
        return bound[0]
    return bound.seconds if isinstance(bound, TimeValue) else bound.moment


def _end(bound: Any) -> Any:
    if isinstance(bound, tuple):
        return bound[1]
    return bound.upper()
