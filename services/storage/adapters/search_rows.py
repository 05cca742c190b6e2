"""Search rows of a study rebuilt after a delete, as if its deleted instances had never been stored.

Both metadata adapters build study and series rows incrementally in ``put_instance``: the first
instance of a study (of a series) gives the row its document and its own tokens, every instance adds
its aggregate tokens (ModalitiesInStudy, SOPClassesInStudy), its modality and SOP class, and the
counts. ``rebuilt_rows`` replays that over the instances that stay, in storing order, so both
adapters rebuild identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.storage.ports import SearchEntry


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
