"""Which patient a study belongs to, remembered briefly in memory from the searches that just read it.

Every search's audit event names the studies it answered, and the audit service then asks storage for
their patients (``patient_lookup``) a moment later. The search has just decrypted those studies'
documents: remembering the three patient attributes here lets the lookup skip decrypting them again,
which halves storage's work per search. Memory only (never written anywhere), bounded, short-lived,
and a deleted study is forgotten at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PATIENT_NAME = "00100010"
PATIENT_ID = "00100020"
ISSUER_OF_PATIENT_ID = "00100021"


@dataclass(frozen=True, slots=True)
class PatientFields:
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None


def _first(doc: dict[str, Any], tag: str) -> Any:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if values else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def patient_fields(doc: dict[str, Any]) -> PatientFields:
    """The patient attributes of a study- (or lower-) level DICOM JSON document."""
    name = _first(doc, PATIENT_NAME)
    return PatientFields(
        patient_id=_text(_first(doc, PATIENT_ID)),
        issuer_of_patient_id=_text(_first(doc, ISSUER_OF_PATIENT_ID)),
        patient_name=_text(name.get("Alphabetic")) if isinstance(name, dict) else None,
    )


class PatientMemo:
    """Study UID -> patient attributes, at most ``size`` entries, each for ``seconds``."""

    def __init__(
        self, size: int = 20_000, seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size = size
        self._seconds = seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, PatientFields]] = OrderedDict()

    def remember(self, study_uid: str, doc: dict[str, Any]) -> None:
        if self._size <= 0:
            return
        self._entries[study_uid] = (self._clock() + self._seconds, patient_fields(doc))
        self._entries.move_to_end(study_uid)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def recall(self, study_uid: str) -> PatientFields | None:
        hit = self._entries.get(study_uid)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._entries[study_uid]
            return None
        return hit[1]

    def forget(self, study_uid: str) -> None:
        self._entries.pop(study_uid, None)

    def __len__(self) -> int:
        return len(self._entries)
