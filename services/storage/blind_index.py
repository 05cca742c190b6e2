"""Blind indexing: keyed tokens that let the metadata database match attribute values it cannot read.

A token is the first 8 bytes of HMAC-SHA256(index key, ``"<attribute>|<kind>|<value>"``), read as a
signed 64-bit integer. Rows store sets of tokens; a query is compiled into clauses of tokens
(``compile_condition``), so equality, prefix, word-prefix and date/time range matching run on indexes
while the database only ever sees opaque numbers. The index key is random, generated once, stored in
the metadata database wrapped by the active KEK, and unwrapped in memory at startup. See docs/qido.md
for what the tokens leak and which patterns fall back to decrypting candidates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pacslib.keyring import KeyWrapper
from services.storage.ports import Level, MetadataStore, TokenClause, WrappedKey
from services.storage.qido_attributes import (
    KEYS_BY_NAME,
    MatchingKey,
    MatchKind,
    keys_at,
    tag_of,
)
from services.storage.query_model import (
    Condition,
    DateCondition,
    DateTimeCondition,
    NameCondition,
    NumberCondition,
    Pattern,
    TextCondition,
    TimeCondition,
    UidCondition,
    as_int,
    name_groups,
    name_words,
    parse_date,
    parse_datetime,
    parse_time,
    values_at,
)

INDEX_KEY_NAME = "qido-v1"
INDEX_KEY_CONTEXT = b"cloudpacs/qido-index-key/v1"
INDEX_KEY_SIZE = 32
MAX_PREFIX = 16  # prefix tokens are kept for the first 16 characters of a value (and of each name word)
OWNER = "@owner"
# Open-ended date ranges are enumerated between these bounds; explicit bounds are clamped to 1000-2999.
OPEN_RANGE_FIRST = dt.date(1800, 1, 1)
OPEN_RANGE_LAST = dt.date(2199, 12, 31)
_EXPLICIT_FIRST = dt.date(1000, 1, 1)
_EXPLICIT_LAST = dt.date(2999, 12, 31)
_LAST_SECOND = 86399

_STUDY_UID = KEYS_BY_NAME[tag_of("StudyInstanceUID")]
_SERIES_UID = KEYS_BY_NAME[tag_of("SeriesInstanceUID")]
_SOP_UID = KEYS_BY_NAME[tag_of("SOPInstanceUID")]
_MODALITIES = KEYS_BY_NAME[tag_of("ModalitiesInStudy")]
_SOP_CLASSES = KEYS_BY_NAME[tag_of("SOPClassesInStudy")]
_MODALITY = (tag_of("Modality"),)


@dataclass(frozen=True, slots=True)
class InstanceTokens:
    """The tokens of one instance for its study, series and instance rows (see ``SearchEntry``)."""

    study: frozenset[int]
    study_aggregate: frozenset[int]
    series: frozenset[int]
    instance: frozenset[int]
    owner: int | None
    modality: str | None


@dataclass(frozen=True, slots=True)
class Compiled:
    """A condition as token clauses; ``exact`` is False when candidates must still be checked."""

    clauses: tuple[TokenClause, ...]
    exact: bool


class BlindIndex:
    """Computes tokens under one secret index key (never logged, never in ``repr``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != INDEX_KEY_SIZE:
            raise ValueError(f"the index key must be {INDEX_KEY_SIZE} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "BlindIndex(<key hidden>)"

    def token(self, name: str, kind: str, value: str) -> int:
        """The token of ``value`` for attribute path ``name`` and token ``kind``."""
        mac = hmac.digest(self._key, f"{name}|{kind}|{value}".encode(), hashlib.sha256)
        return int.from_bytes(mac[:8], "big", signed=True)

    # -- indexing ---------------------------------------------------------------------------------
    def uid_token(self, key: MatchingKey, uid: str) -> int:
        return self.token(key.name, "eq", uid)

    def owner_token(self, org: str) -> int:
        """The access token of an organization (rows of studies it stored carry it)."""
        return self.token(OWNER, "eq", org)

    def instance_tokens(
        self,
        doc: dict[str, Any],
        *,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        owner_org: str | None,
    ) -> InstanceTokens:
        """Tokens of an instance's DICOM JSON for its study, series and instance rows."""
        modalities = [str(v) for v in values_at(doc, _MODALITY) if isinstance(v, str) and v]
        modality = modalities[0] if modalities else None
        aggregate = set(self._value_tokens(_SOP_CLASSES, [sop_class_uid]))
        if modality is not None:
            aggregate.update(self._value_tokens(_MODALITIES, [modality]))
        study = self._level_tokens(Level.STUDY, doc) | {self.uid_token(_STUDY_UID, study_uid)}
        series = self._level_tokens(Level.SERIES, doc) | {
            self.uid_token(_STUDY_UID, study_uid),
            self.uid_token(_SERIES_UID, series_uid),
        }
        instance = self._level_tokens(Level.INSTANCE, doc) | {
            self.uid_token(_STUDY_UID, study_uid),
            self.uid_token(_SERIES_UID, series_uid),
            self.uid_token(_SOP_UID, sop_uid),
        }
        return InstanceTokens(
            study=frozenset(study | aggregate),
            study_aggregate=frozenset(aggregate),
            series=frozenset(series),
            instance=frozenset(instance),
            owner=None if owner_org is None else self.owner_token(owner_org),
            modality=modality,
        )

    def _level_tokens(self, level: Level, doc: dict[str, Any]) -> set[int]:
        out: set[int] = set()
        for key in keys_at(level):
            if not key.computed:
                out.update(self._value_tokens(key, values_at(doc, key.path)))
        return out

    def _value_tokens(self, key: MatchingKey, values: Iterable[Any]) -> Iterator[int]:
        name = key.name
        for value in values:
            for kind, text in _value_terms(key.kind, value):
                yield self.token(name, kind, text)

    # -- querying ---------------------------------------------------------------------------------
    def compile(self, condition: Condition) -> Compiled:
        """The token clauses that select (a superset of, unless ``exact``) the rows ``condition`` matches."""
        name = condition.key.name
        if isinstance(condition, UidCondition):
            return Compiled(
                (TokenClause(frozenset(self.token(name, "eq", u) for u in condition.uids), 0),), True
            )
        if isinstance(condition, NumberCondition):
            tokens = frozenset(self.token(name, "eq", str(n)) for n in condition.numbers)
            return Compiled((TokenClause(tokens, 2),), True)
        if isinstance(condition, TextCondition):
            return self._patterns(name, condition.patterns)
        if isinstance(condition, NameCondition):
            if not condition.fuzzy:
                return self._patterns(name, (condition.pattern,))
            return self._words(name, condition.words)
        if isinstance(condition, DateCondition):
            low = condition.low if condition.low != dt.date.min else OPEN_RANGE_FIRST
            high = condition.high if condition.high != dt.date.max else OPEN_RANGE_LAST
            return Compiled((self._date_clause(name, low, high),), True)
        if isinstance(condition, DateTimeCondition):
            low_day = condition.low.date() if condition.low != dt.datetime.min else OPEN_RANGE_FIRST
            high_day = condition.high.date() if condition.high != dt.datetime.max else OPEN_RANGE_LAST
            return Compiled((self._date_clause(name, low_day, high_day),), condition.whole_days)
        if isinstance(condition, TimeCondition):
            low_s = int(condition.low)
            high_s = min(int(condition.high), _LAST_SECOND)
            tokens = frozenset(self.token(name, kind, text) for kind, text in time_cover(low_s, high_s))
            return Compiled((TokenClause(tokens, 4),), not condition.fractional)
        raise TypeError(f"no blind-index compilation for {type(condition).__name__}")

    def _patterns(self, name: str, patterns: Iterable[Pattern]) -> Compiled:
        tokens: set[int] = set()
        exact = True
        rank = 0
        for pattern in patterns:
            if not pattern.has_wildcard:
                tokens.add(self.token(name, "eq", pattern.text))
                rank = max(rank, 1)
                continue
            lead = pattern.lead
            if not lead:
                return Compiled((), False)  # '*ABC': no token narrows this value
            tokens.add(self.token(name, "pre", lead[:MAX_PREFIX]))
            exact = exact and pattern.is_prefix and len(lead) <= MAX_PREFIX
            rank = max(rank, _prefix_rank(len(lead)))
        return Compiled((TokenClause(frozenset(tokens), rank),), exact)

    def _words(self, name: str, words: Iterable[Pattern]) -> Compiled:
        clauses: list[TokenClause] = []
        exact = True
        for word in words:
            lead = word.lead
            if not lead:
                exact = False
                continue
            clauses.append(
                TokenClause(frozenset({self.token(name, "word", lead[:MAX_PREFIX])}), _prefix_rank(len(lead)))
            )
            whole = not word.has_wildcard or word.is_prefix
            exact = exact and whole and len(lead) <= MAX_PREFIX
        return Compiled(tuple(clauses), exact)

    def _date_clause(self, name: str, low: dt.date, high: dt.date) -> TokenClause:
        low = max(low, _EXPLICIT_FIRST)
        high = min(high, _EXPLICIT_LAST)
        terms = date_cover(low, high)
        days = (high - low).days + 1
        rank = 2 if days <= 31 else 3 if days <= 366 else 5
        return TokenClause(frozenset(self.token(name, kind, text) for kind, text in terms), rank)


def _prefix_rank(length: int) -> int:
    """How broad a prefix is (``TokenClause.rank``): 6+ characters narrow, 1-2 hardly."""
    return 2 if length >= 6 else 3 if length >= 3 else 4


def _value_terms(kind: MatchKind, value: Any) -> Iterator[tuple[str, str]]:
    """The (token kind, text) terms an attribute value is indexed under."""
    if kind is MatchKind.UID:
        if isinstance(value, str) and value:
            yield "eq", value
    elif kind is MatchKind.NUMBER:
        n = as_int(value)
        if n is not None:
            yield "eq", str(n)
    elif kind is MatchKind.NAME:
        for group in name_groups(value):
            yield "eq", group
            yield from _prefixes("pre", group)
            for word in name_words(group):
                yield from _prefixes("word", word)
    elif kind is MatchKind.DATE:
        d = parse_date(str(value)) if isinstance(value, str) else None
        if d is not None:
            yield from date_terms(d)
    elif kind is MatchKind.TIME:
        t = parse_time(str(value)) if isinstance(value, str) else None
        if t is not None:
            yield from time_terms(int(t.seconds))
    elif kind is MatchKind.DATETIME:
        moment = parse_datetime(str(value)) if isinstance(value, str) else None
        if moment is not None and moment.parts >= 3:
            yield from date_terms(moment.moment.date())
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        if text:
            yield "eq", text
            yield from _prefixes("pre", text)


def _prefixes(kind: str, text: str) -> Iterator[tuple[str, str]]:
    for n in range(1, min(len(text), MAX_PREFIX) + 1):
        yield kind, text[:n]


def date_terms(d: dt.date) -> Iterator[tuple[str, str]]:
    """A date's hierarchical terms: day, month, year and decade."""
    yield "day", f"{d.year:04d}{d.month:02d}{d.day:02d}"
    yield "month", f"{d.year:04d}{d.month:02d}"
    yield "year", f"{d.year:04d}"
    yield "decade", f"{d.year // 10:03d}"


def time_terms(seconds: int) -> Iterator[tuple[str, str]]:
    """A time's hierarchical terms: hour, minute and second (a reduced-precision value is padded)."""
    hh, rest = divmod(seconds, 3600)
    mm, ss = divmod(rest, 60)
    yield "hour", f"{hh:02d}"
    yield "minute", f"{hh:02d}{mm:02d}"
    yield "second", f"{hh:02d}{mm:02d}{ss:02d}"


def _month_end(d: dt.date) -> dt.date:
    first_of_next = dt.date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return first_of_next - dt.timedelta(days=1)


def date_cover(low: dt.date, high: dt.date) -> list[tuple[str, str]]:
    """The fewest hierarchical terms (decades, years, months, days) that cover ``[low, high]`` exactly."""
    out: list[tuple[str, str]] = []
    d = low
    while d <= high:
        if (d.month, d.day) == (1, 1) and d.year % 10 == 0 and dt.date(d.year + 9, 12, 31) <= high:
            out.append(("decade", f"{d.year // 10:03d}"))
            d = dt.date(d.year + 10, 1, 1)
        elif (d.month, d.day) == (1, 1) and dt.date(d.year, 12, 31) <= high:
            out.append(("year", f"{d.year:04d}"))
            d = dt.date(d.year + 1, 1, 1)
        elif d.day == 1 and _month_end(d) <= high:
            out.append(("month", f"{d.year:04d}{d.month:02d}"))
            d = _month_end(d) + dt.timedelta(days=1)
        else:
            out.append(("day", f"{d.year:04d}{d.month:02d}{d.day:02d}"))
            d += dt.timedelta(days=1)
    return out


def time_cover(low: int, high: int) -> list[tuple[str, str]]:
    """The fewest hierarchical terms (hours, minutes, seconds) that cover seconds ``[low, high]``."""
    out: list[tuple[str, str]] = []
    s = low
    while s <= high:
        hh, rest = divmod(s, 3600)
        mm, ss = divmod(rest, 60)
        if rest == 0 and s + 3599 <= high:
            out.append(("hour", f"{hh:02d}"))
            s += 3600
        elif ss == 0 and s + 59 <= high:
            out.append(("minute", f"{hh:02d}{mm:02d}"))
            s += 60
        else:
            out.append(("second", f"{hh:02d}{mm:02d}{ss:02d}"))
            s += 1
    return out


# -- the index key -------------------------------------------------------------------------------
async def load_index(metadata: MetadataStore, keyring: KeyWrapper) -> BlindIndex:
    """Unwrap the index key, creating and storing it (wrapped by the active KEK) on first use."""
    wrapped = await metadata.get_index_key(INDEX_KEY_NAME)
    if wrapped is None:
        kek_id, sealed = keyring.wrap(os.urandom(INDEX_KEY_SIZE), INDEX_KEY_CONTEXT)
        # Another replica may have stored one first: the stored key wins, ours is forgotten.
        wrapped = await metadata.add_index_key(INDEX_KEY_NAME, WrappedKey(kek_id, sealed))
    return BlindIndex(keyring.unwrap(wrapped.kek_id, wrapped.wrapped, INDEX_KEY_CONTEXT))


async def rewrap_index_key(metadata: MetadataStore, keyring: KeyWrapper) -> int:
    """Re-wrap the index key with the active KEK; return 1 if it was re-wrapped, else 0."""
    wrapped = await metadata.get_index_key(INDEX_KEY_NAME)
    if wrapped is None or wrapped.kek_id == keyring.active_id:
        return 0
    kek_id, sealed = keyring.rewrap(wrapped.kek_id, wrapped.wrapped, INDEX_KEY_CONTEXT)
    return int(await metadata.replace_index_key(INDEX_KEY_NAME, wrapped, WrappedKey(kek_id, sealed)))
