"""Search rows of a study rebuilt after a delete, as if its deleted instances had never been stored.

Both metadata adapters build study and series rows incrementally in ``put_instance``: the first
instance of a study (of a series) gives the row its document and its own tokens, every instance adds
its aggregate tokens (ModalitiesInStudy, SOPClassesInStudy), its modality and SOP class, and the
counts. ``rebuilt_rows`` replays that over the instances that stay, in storing order, so both
adapters rebuild identically. ``new_studies`` builds the rows of a bulk load the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.storage.ports import BulkInstance, SearchEntry


@dataclass(frozen=True, slots=True)
class Survivor:
    """A searchable instance that stays in its study, in storing order."""

    object_id: str
    series_uid: str
    sop_class_uid: str


@dataclass(frozen=True, slots=True)
class RebuiltRow:
    """The new content of a study row (``series_uid`` None) or of one of its series rows."""

    series_uid: str | None
    doc_object_id: str
    document: bytes
    tokens: frozenset[int]
    instance_count: int
    series_count: int = 0
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RebuiltStudy:
    """The study row and its series rows (in order of their first instance)."""

    study: RebuiltRow
    series: tuple[RebuiltRow, ...]


def rebuilt_rows(
    survivors: Sequence[Survivor], entries: Mapping[str, SearchEntry], owner_token: int | None
) -> RebuiltStudy | None:
    """The study's rows from its surviving searchable instances (None when none survive).

    ``entries`` must hold the search entry of every survivor (by object id); ``owner_token`` is the
    study row's access token, which every row inherits.
    """
    if not survivors:
        return None
    owner = frozenset() if owner_token is None else frozenset({owner_token})
    first = entries[survivors[0].object_id]
    study_tokens = set(first.study_tokens)
    modalities: set[str] = set()
    sop_classes: set[str] = set()
    firsts: dict[str, Survivor] = {}
    counts: dict[str, int] = {}
    for survivor in survivors:
        entry = entries[survivor.object_id]
        study_tokens |= entry.study_aggregate_tokens
        if entry.modality is not None:
            modalities.add(entry.modality)
        sop_classes.add(survivor.sop_class_uid)
        firsts.setdefault(survivor.series_uid, survivor)
        counts[survivor.series_uid] = counts.get(survivor.series_uid, 0) + 1
    study = RebuiltRow(
        series_uid=None,
        doc_object_id=survivors[0].object_id,
        document=first.study_document,
        tokens=frozenset(study_tokens) | owner,
        instance_count=len(survivors),
        series_count=len(firsts),
        modalities=tuple(sorted(modalities)),
        sop_classes=tuple(sorted(sop_classes)),
    )
    series = tuple(
        RebuiltRow(
            series_uid=series_uid,
            doc_object_id=head.object_id,
            document=entries[head.object_id].series_document,
            tokens=entries[head.object_id].series_tokens | owner,
            instance_count=counts[series_uid],
        )
        for series_uid, head in firsts.items()
    )
    return RebuiltStudy(study, series)


@dataclass(frozen=True, slots=True)
class NewStudy:
    """A study of a bulk load: its instances (in batch order) and the rows ``put_instance`` would build."""

    study_uid: str
    owner_org: str | None
    owner_token: int | None
    instances: tuple[BulkInstance, ...]
    rows: RebuiltStudy


def new_studies(batch: Sequence[BulkInstance]) -> list[NewStudy]:
    """Group a bulk load by study (in order of first appearance) and build each study's search rows.

    ValueError when an object id or SOP Instance UID repeats or a study's instances disagree on its
    owner. The study's access token is its first instance's, as ``put_instance`` would keep it.
    """
    groups: dict[str, list[BulkInstance]] = {}
    sops: set[str] = set()
    objects: set[str] = set()
    for item in batch:
        record = item.record
        if record.sop_uid in sops or record.object_id in objects:
            raise ValueError("a bulk load repeats a SOP Instance UID or an object id")
        sops.add(record.sop_uid)
        objects.add(record.object_id)
        groups.setdefault(record.study_uid, []).append(item)
    out = []
    for study_uid, items in groups.items():
        owner_org = items[0].record.owner_org
        if any(i.record.owner_org != owner_org for i in items):
            raise ValueError("the instances of a study in a bulk load have different owners")
        owner_token = items[0].search.owner_token
        survivors = [Survivor(i.record.object_id, i.record.series_uid, i.record.sop_class_uid) for i in items]
        rows = rebuilt_rows(survivors, {i.record.object_id: i.search for i in items}, owner_token)
        assert rows is not None  # a group is never empty
        out.append(NewStudy(study_uid, owner_org, owner_token, tuple(items), rows))
    return out
