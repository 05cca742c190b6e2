"""Storage's short-lived memory of which patient a study belongs to (read by the audit's lookup)."""

from __future__ import annotations

from services.storage.patient_memo import PatientFields, PatientMemo, patient_fields


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def study_doc(name: str, pid: str, issuer: str | None = None) -> dict[str, object]:
    doc: dict[str, object] = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": {"vr": "LO", "Value": [pid]},
        "00080020": {"vr": "DA", "Value": ["20240101"]},
    }
    if issuer is not None:
        doc["00100021"] = {"vr": "LO", "Value": [issuer]}
    return doc


def test_patient_fields_of_a_document() -> None:
    assert patient_fields(study_doc("DOE^JANE", "PID-1", "HOSP")) == PatientFields(
        "PID-1", "HOSP", "DOE^JANE"
    )
    assert patient_fields({}) == PatientFields(None, None, None)
    empty = {"00100010": {"vr": "PN"}, "00100020": {"vr": "LO", "Value": [""]}}
    assert patient_fields(empty) == PatientFields(None, None, None)


def test_entries_expire_are_bounded_and_are_forgotten() -> None:
    clock = Clock()
    memo = PatientMemo(size=2, seconds=60, clock=clock)
    memo.remember("1.1", study_doc("DOE^JANE", "PID-1"))
    memo.remember("1.2", study_doc("ROE^RICHARD", "PID-2"))
    assert memo.recall("1.1") == PatientFields("PID-1", None, "DOE^JANE")

    memo.remember("1.3", study_doc("POE^EDGAR", "PID-3"))  # the least recently stored one goes
    assert len(memo) == 2
    assert memo.recall("1.1") is None
    assert memo.recall("1.2") is not None

    memo.forget("1.2")  # a deleted study
    assert memo.recall("1.2") is None

    clock.now += 61
    assert memo.recall("1.3") is None
    assert len(memo) == 0


def test_a_memo_of_size_zero_remembers_nothing() -> None:
    memo = PatientMemo(size=0)
    memo.remember("1.1", study_doc("DOE^JANE", "PID-1"))
    assert memo.recall("1.1") is None
