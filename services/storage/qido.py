"""QIDO-RS: search for studies, series and instances (PS3.18 10.6) over the blind index.

A parsed ``QidoQuery`` is answered level by level. Study-level conditions of a series or instance
search first resolve the matching studies (likewise series-level conditions of an instance search);
the target level is then paged by the metadata store. Conditions the tokens answer exactly run in the
database; the others narrow the candidates with whatever tokens they have, and the candidates are
decrypted and checked here, at most ``QidoLimits.scan_cap`` of them per search. Only the rows returned
(or checked) are ever decrypted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacslib import envelope
from pacslib.errors import BadRequestError, IntegrityFailureError
from services.storage.blind_index import BlindIndex
from services.storage.bulk_markers import MARKER_PREFIX, instance_url, resolve_markers
from services.storage.context import StorageContext
from services.storage.objects import metadata_context
from services.storage.patient_memo import PatientFields, patient_fields
from services.storage.ports import IndexQuery, IndexRow, Level, SearchEntry, TokenClause
from services.storage.qido_attributes import (
    INSTANCE_AVAILABILITY,
    INSTANCE_DEFAULTS,
    KEYS_BY_NAME,
    MODALITIES_IN_STUDY,
    RETRIEVE_URL,
    SERIES_DEFAULTS,
    SERIES_INSTANCE_COUNT,
    SERIES_LEVEL_TAGS,
    SERIES_UID,
    SOP_CLASSES_IN_STUDY,
    SOP_UID,
    STUDY_COMPUTED,
    STUDY_DEFAULTS,
    STUDY_INSTANCE_COUNT,
    STUDY_LEVEL_TAGS,
    STUDY_SERIES_COUNT,
    STUDY_UID,
)
from services.storage.query_model import AccessScope, Condition, QidoQuery, UidCondition, values_at

_MARKER_BYTES = MARKER_PREFIX.encode()
SCAN_BATCH = 500  # candidate rows fetched (and checked) per round when conditions need decryption
MAX_PARENTS = 5000  # studies (or series) a series or instance search may narrow to by upper-level keys

_STUDY_UID_KEY = KEYS_BY_NAME[STUDY_UID]
_SERIES_UID_KEY = KEYS_BY_NAME[SERIES_UID]


class QueryTooBroadError(BadRequestError):
    """A search would have to decrypt and check more candidates than allowed."""


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of results (DICOM JSON) and whether more results follow it."""

    documents: list[dict[str, Any]]
    more: bool


# -- documents written at indexing time ----------------------------------------------------------
def study_document_context(object_id: str) -> str:
    """The identity under which a study row's document is sealed (with that instance's data key)."""
    return f"{object_id}#study"


def series_document_context(object_id: str) -> str:
    """The identity under which a series row's document is sealed (with that instance's data key)."""
    return f"{object_id}#series"


def _seal(dek: bytes, context: str, doc: dict[str, Any]) -> bytes:
    return envelope.encrypt_bytes(dek, context, json.dumps(doc, separators=(",", ":")).encode())


def search_entry(
    index: BlindIndex,
    dek: bytes,
    metadata: dict[str, Any],
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    sop_class_uid: str,
    object_id: str,
    owner_org: str | None,
) -> SearchEntry:
    """The search rows' tokens and sealed documents for a new instance (see ``SearchEntry``)."""
    tokens = index.instance_tokens(
        metadata,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        owner_org=owner_org,
    )
    study_doc = {tag: v for tag, v in metadata.items() if tag in STUDY_LEVEL_TAGS}
    series_doc = {
        tag: v for tag, v in metadata.items() if tag in STUDY_LEVEL_TAGS or tag in SERIES_LEVEL_TAGS
    }
    return SearchEntry(
        study_tokens=tokens.study,
        study_aggregate_tokens=tokens.study_aggregate,
        series_tokens=tokens.series,
        instance_tokens=tokens.instance,
        study_document=_seal(dek, study_document_context(object_id), study_doc),
        series_document=_seal(dek, series_document_context(object_id), series_doc),
        modality=tokens.modality,
        owner_token=tokens.owner,
    )


def _open(ctx: StorageContext, row: IndexRow) -> tuple[dict[str, Any], bool]:
    """Decrypt a row's document; also say whether it holds bulk data markers."""
    contexts = {
        Level.STUDY: study_document_context,
        Level.SERIES: series_document_context,
        Level.INSTANCE: metadata_context,
    }
    try:
        dek = ctx.keyring.unwrap(row.key.kek_id, row.key.wrapped, envelope.dek_context(row.sealed_by))
        plain = envelope.decrypt_bytes(dek, contexts[row.level](row.sealed_by), row.document)
    except envelope.IntegrityError as exc:
        raise IntegrityFailureError("a stored search document failed its integrity check") from exc
    doc: dict[str, Any] = json.loads(plain)
    return doc, _MARKER_BYTES in plain


def _element(vr: str, values: Sequence[Any]) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _computed(row: IndexRow) -> dict[str, Any]:
    """The attributes computed from a row's clear counters and lists."""
    if row.level is Level.STUDY:
        return {
            MODALITIES_IN_STUDY: _element("CS", row.modalities),
            SOP_CLASSES_IN_STUDY: _element("UI", row.sop_classes),
            STUDY_SERIES_COUNT: _element("IS", [row.series_count]),
            STUDY_INSTANCE_COUNT: _element("IS", [row.instance_count]),
            INSTANCE_AVAILABILITY: _element("CS", ["ONLINE"]),
        }
    if row.level is Level.SERIES:
        return {SERIES_INSTANCE_COUNT: _element("IS", [row.instance_count])}
    return {INSTANCE_AVAILABILITY: _element("CS", ["ONLINE"])}


@dataclass(slots=True)
class _Hit:
    row: IndexRow
    doc: dict[str, Any] | None = None
    markers: bool = False  # the document holds bulk data markers (to rewrite to BulkDataURIs)


# -- searching ------------------------------------------------------------------------------------
def _scope_clause(index: BlindIndex, scope: AccessScope) -> TokenClause | None:
    """The access rules as a clause (None: everything is visible)."""
    if scope.all:
        return None
    tokens = {index.owner_token(org) for org in scope.orgs}
    tokens |= {index.uid_token(_STUDY_UID_KEY, uid) for uid in scope.study_uids}
    return TokenClause(frozenset(tokens), 5 if scope.orgs else 0)


def _uid_clause(index: BlindIndex, key_tag: str, uids: Sequence[str] | frozenset[str]) -> TokenClause:
    key = KEYS_BY_NAME[key_tag]
    return TokenClause(frozenset(index.uid_token(key, u) for u in uids), 0)


class _Searcher:
    """One search: compiles conditions per level and pages them, decrypting only what it must."""

    def __init__(self, ctx: StorageContext, scope: TokenClause | None) -> None:
        self._ctx = ctx
        self._scope = scope
        self._examined = 0

    def _compile(
        self, conditions: Sequence[Condition], extra: Sequence[TokenClause]
    ) -> tuple[tuple[TokenClause, ...], list[Condition]]:
        """All token clauses of a search, and the conditions the tokens do not answer exactly."""
        compiled = [self._ctx.index.compile(c) for c in conditions]
        clauses = [*([self._scope] if self._scope is not None else []), *extra]
        clauses += [clause for comp in compiled for clause in comp.clauses]
        residual = [c for c, comp in zip(conditions, compiled, strict=True) if not comp.exact]
        return tuple(clauses), residual

    async def page(
        self,
        level: Level,
        conditions: Sequence[Condition],
        extra: Sequence[TokenClause],
        offset: int,
        limit: int,
    ) -> list[_Hit]:
        """Rows ``offset .. offset+limit`` of ``level`` matching every condition and clause."""
        clauses, residual = self._compile(conditions, extra)
        if not residual:
            rows = await self._ctx.metadata.search(IndexQuery(level, clauses, offset=offset, limit=limit))
            return [_Hit(r) for r in rows]
        return await self._scan(level, clauses, residual, offset + limit, offset)

    async def first(
        self, level: Level, conditions: Sequence[Condition], extra: Sequence[TokenClause], most: int
    ) -> list[IndexRow]:
        """Up to ``most`` matching rows of ``level``: more than ``most`` returned means too many."""
        clauses, residual = self._compile(conditions, extra)
        if not residual:
            return await self._ctx.metadata.search(IndexQuery(level, clauses, limit=most + 1))
        return [h.row for h in await self._scan(level, clauses, residual, most + 1, 0)]

    async def _scan(
        self, level: Level, clauses: tuple[TokenClause, ...], residual: list[Condition], need: int, skip: int
    ) -> list[_Hit]:
        """Fetch candidates in ``seq`` order, decrypt and check them, until ``need`` matched."""
        cap = self._ctx.qido.scan_cap
        matched: list[_Hit] = []
        after = 0
        while len(matched) < need:
            batch = await self._ctx.metadata.search(IndexQuery(level, clauses, after=after, limit=SCAN_BATCH))
            for row in batch:
                self._examined += 1
                if self._examined > cap:
                    raise _too_broad(cap)
                doc, markers = _open(self._ctx, row)
                probe = {**doc, **_computed(row)}
                if all(c.matches(values_at(probe, c.key.path)) for c in residual):
                    matched.append(_Hit(row, doc, markers))
                    if len(matched) >= need:
                        break
            if len(batch) < SCAN_BATCH:
                break
            after = batch[-1].seq
        return matched[skip:need]


def _too_broad(cap: int) -> QueryTooBroadError:
    return QueryTooBroadError(
        f"this search would have to check more than {cap} candidates: add a narrower matching key "
        "(an exact value, a prefix such as DOE*, or a date range)"
    )


def _check_parents(count: int, what: str) -> None:
    if count > MAX_PARENTS:
        raise QueryTooBroadError(
            f"the {what}-level matching keys of this search match more than {MAX_PARENTS} {what}: "
            "add a narrower matching key"
        )


def _direct_uids(conditions: Sequence[Condition], tag: str) -> list[UidCondition]:
    return [
        c for c in conditions if isinstance(c, UidCondition) and c.key.tag == tag and len(c.key.path) == 1
    ]


async def search(ctx: StorageContext, query: QidoQuery, scope: AccessScope, base_url: str) -> SearchResult:
    """Answer a QIDO-RS query within the caller's access scope; ``base_url`` ends with ``/dicom-web``."""
    if not scope.all and not scope.orgs and not scope.study_uids:
        return SearchResult([], False)
    index = ctx.index
    searcher = _Searcher(ctx, _scope_clause(index, scope))
    level = query.level
    conditions = list(query.conditions)
    if query.study_uid is not None:
        conditions.append(UidCondition(_STUDY_UID_KEY, frozenset({query.study_uid})))
    if query.series_uid is not None:
        conditions.append(UidCondition(_SERIES_UID_KEY, frozenset({query.series_uid})))
    study_uids = _direct_uids(conditions, STUDY_UID)
    series_uids = _direct_uids(conditions, SERIES_UID)
    extra: list[TokenClause] = []
    own = [c for c in conditions if c.key.level is level]
    if level > Level.STUDY:
        # Study and series UIDs are tokens of every lower row: they filter directly. A study holds
        # many series and instances, so its UID ranks after a series or instance UID as a driver.
        extra += [TokenClause(index.compile(c).clauses[0].tokens, 1) for c in study_uids]
        upper_study = [c for c in conditions if c.key.level is Level.STUDY and c not in study_uids]
        if upper_study:
            rows = await searcher.first(Level.STUDY, [*upper_study, *study_uids], (), MAX_PARENTS)
            if not rows:
                return SearchResult([], False)
            _check_parents(len(rows), "studies")
            extra.append(_uid_clause(index, STUDY_UID, sorted({r.study_uid for r in rows})))
    if level is Level.INSTANCE:
        extra += [index.compile(c).clauses[0] for c in series_uids]
        upper_series = [c for c in conditions if c.key.level is Level.SERIES and c not in series_uids]
        if upper_series:
            rows = await searcher.first(Level.SERIES, upper_series, extra, MAX_PARENTS)
            if not rows:
                return SearchResult([], False)
            _check_parents(len(rows), "series")
            extra.append(_uid_clause(index, SERIES_UID, sorted({r.series_uid or "" for r in rows})))
    hits = await searcher.page(level, own, extra, query.offset, query.limit + 1)
    more = len(hits) > query.limit
    hits = hits[: query.limit]
    parents = await _parents(ctx, query, hits)
    wanted = None if query.include_all else return_tags(query)
    documents = []
    for hit in hits:
        doc, markers = (hit.doc, hit.markers) if hit.doc is not None else _open(ctx, hit.row)
        if level is Level.STUDY:
            ctx.patients.remember(hit.row.study_uid, doc)  # for the audit's patient lookup, next
        result = _result(hit.row, doc, parents, base_url, wanted)
        documents.append(_public_bulk_uris(result, hit.row, base_url) if markers else result)
    return SearchResult(documents, more)


async def study_patients(
    ctx: StorageContext, study_uids: Sequence[str]
) -> dict[str, tuple[PatientFields, str | None]]:
    """The patient attributes and the owning organization of each of these studies that has a search
    row, whoever owns it (for internal callers only). Studies a search just answered are not decrypted
    again (``ctx.patients``)."""
    found: dict[str, tuple[PatientFields, str | None]] = {}
    for row, owner in await ctx.metadata.study_rows(study_uids):
        fields = ctx.patients.recall(row.study_uid)
        if fields is None:
            fields = patient_fields(_open(ctx, row)[0])
        found[row.study_uid] = (fields, owner)
    return found


# -- results --------------------------------------------------------------------------------------
def return_tags(query: QidoQuery) -> frozenset[str]:
    """The attributes returned for each result (PS3.18 10.6.3.3), before ``includefield=all``."""
    tags: set[str] = set(query.include | query.matched_tags)
    if query.level is Level.STUDY:
        tags |= STUDY_DEFAULTS
    elif query.level is Level.SERIES:
        tags |= SERIES_DEFAULTS
        if query.study_uid is None:
            tags |= STUDY_DEFAULTS
    else:
        tags |= INSTANCE_DEFAULTS
        if query.series_uid is None:
            tags |= SERIES_DEFAULTS
        if query.study_uid is None:
            tags |= STUDY_DEFAULTS
    return frozenset(tags)


async def _parents(
    ctx: StorageContext, query: QidoQuery, hits: list[_Hit]
) -> dict[tuple[str, ...], IndexRow]:
    """The study (and series) rows of the results, when computed attributes of theirs are returned."""
    if not hits or query.level is Level.STUDY:
        return {}
    tags = return_tags(query)
    out: dict[tuple[str, ...], IndexRow] = {}
    if tags & STUDY_COMPUTED or query.include_all:
        uids = sorted({h.row.study_uid for h in hits})
        clause = _uid_clause(ctx.index, STUDY_UID, uids)
        for row in await ctx.metadata.search(IndexQuery(Level.STUDY, (clause,), limit=len(uids))):
            out[(row.study_uid,)] = row
    if query.level is Level.INSTANCE and (SERIES_INSTANCE_COUNT in tags or query.include_all):
        series = sorted({h.row.series_uid or "" for h in hits})
        clause = _uid_clause(ctx.index, SERIES_UID, series)
        for row in await ctx.metadata.search(IndexQuery(Level.SERIES, (clause,), limit=len(hits))):
            out[(row.study_uid, row.series_uid or "")] = row
    return out


def _retrieve_url(row: IndexRow, base_url: str) -> str:
    url = f"{base_url}/studies/{row.study_uid}"
    if row.series_uid is not None:
        url += f"/series/{row.series_uid}"
    if row.sop_uid is not None:
        url += f"/instances/{row.sop_uid}"
    return url


def _result(
    row: IndexRow,
    doc: dict[str, Any],
    parents: dict[tuple[str, ...], IndexRow],
    base_url: str,
    wanted: frozenset[str] | None,
) -> dict[str, Any]:
    """One result: the ``wanted`` attributes (None: all) of the row's document plus the computed ones."""
    available = dict(doc)
    available.update(_computed(row))
    study = parents.get((row.study_uid,))
    if study is not None:
        available.update({t: v for t, v in _computed(study).items() if t in STUDY_COMPUTED})
    series = parents.get((row.study_uid, row.series_uid or ""))
    if series is not None:
        available.update(_computed(series))
    available[STUDY_UID] = _element("UI", [row.study_uid])
    if row.series_uid is not None:
        available[SERIES_UID] = _element("UI", [row.series_uid])
    if row.sop_uid is not None:
        available[SOP_UID] = _element("UI", [row.sop_uid])
    available[RETRIEVE_URL] = _element("UR", [_retrieve_url(row, base_url)])
    chosen = available if wanted is None else {t: v for t, v in available.items() if t in wanted}
    return {t: chosen[t] for t in sorted(chosen)}


def _public_bulk_uris(result: dict[str, Any], row: IndexRow, base_url: str) -> dict[str, Any]:
    """Turn the stored bulk data markers into absolute BulkDataURIs (instance rows only carry them)."""
    text = json.dumps(result, separators=(",", ":"))
    if MARKER_PREFIX not in text:
        return result
    if row.series_uid is None or row.sop_uid is None:  # never expected: such rows hold no bulk data
        raise IntegrityFailureError("a study or series search document holds bulk data references")
    resolved: dict[str, Any] = json.loads(
        resolve_markers(text, instance_url(base_url, row.study_uid, row.series_uid, row.sop_uid))
    )
    return resolved
