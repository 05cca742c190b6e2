"""QIDO-RS searches through the storage service's own code, on a real (SQLite) metadata store."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from pacslib import envelope
from pacslib.errors import BadRequestError
from services.storage.context import QidoLimits, StorageContext, open_context
from services.storage.instances import NewInstance, index_instance
from services.storage.kek import rewrap_all
from services.storage.ports import Level, WrappedKey
from services.storage.qido import QueryTooBroadError, search
from services.storage.query_model import AccessScope, parse_query
from services.storage.settings import StorageSettings
from tests.dicom_factory import new_uid

ALL = AccessScope(all=True)
BASE = "https://pacs.example/dicom-web"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[StorageContext]:
    context = await open_context(StorageSettings(state_dir=tmp_path / "state"))
    yield context
    await context.close()


async def store(
    ctx: StorageContext,
    study: str,
    series: str,
    *,
    owner_org: str | None = None,
    sop_class: str = CTImageStorage,
    **attributes: Any,
) -> str:
    """Index one instance (its metadata only: search never reads object bytes); return its SOP UID."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    for name, value in attributes.items():
        setattr(ds, name, value)
    object_id = uuid.uuid4().hex
    kek_id, wrapped = ctx.keyring.wrap(envelope.new_data_key(), envelope.dek_context(object_id))
    await ctx.metadata.add_pending_object(object_id, WrappedKey(kek_id, wrapped), time.time())
    await index_instance(
        ctx,
        NewInstance(
            study_uid=study,
            series_uid=series,
            sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=sop_class,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            object_id=object_id,
            size=0,
            sha256=EMPTY_SHA256,
            metadata=ds.to_json_dict(),
            frames=None,
            owner_org=owner_org,
        ),
    )
    return str(ds.SOPInstanceUID)


async def find(
    ctx: StorageContext,
    level: Level,
    params: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    study: str | None = None,
    series: str | None = None,
    scope: AccessScope = ALL,
) -> list[dict[str, Any]]:
    items = list(params.items()) if isinstance(params, dict) else list(params or [])
    query = parse_query(level, items, study_uid=study, series_uid=series)
    return (await search(ctx, query, scope, BASE)).documents


def value(doc: dict[str, Any], keyword: str) -> Any:
    element = doc.get(f"{pydicom.datadict.tag_for_keyword(keyword):08X}")
    if element is None:
        return None
    values = element.get("Value", [])
    first = values[0] if values else None
    return first["Alphabetic"] if isinstance(first, dict) and "Alphabetic" in first else first


def names(docs: list[dict[str, Any]]) -> list[str]:
    return [value(d, "PatientName") for d in docs]


@pytest.fixture
async def clinic(ctx: StorageContext) -> dict[str, Any]:
    """Four patients' studies; the second has a CT and an MR series."""
    people = [
        ("DOE^JOHN", "PID-1", "20260105", "083000", "org-a"),
        ("Döe^Jane", "PID-2", "20260210", "101500", "org-a"),
        ("SMITH^ALEX", "pid-3", "20251231", "235959", "org-b"),
        ("DOERING^Paul", "PID-4", "19991231", "12", None),
    ]
    studies = []
    for i, (name, pid, date, tm, org) in enumerate(people):
        study, series = new_uid(), new_uid()
        studies.append(study)
        common = {
            "PatientName": name,
            "PatientID": pid,
            "StudyDate": date,
            "StudyTime": tm,
            "AccessionNumber": f"ACC{i}",
            "StudyDescription": "CT HEAD" if i % 2 == 0 else "CHEST",
            "PatientBirthDate": "19700101",
            "PatientSex": "F" if i % 2 else "M",
            "ReferringPhysicianName": "REFERRER^KIM",
        }
        for n in (1, 2):
            await store(
                ctx, study, series, owner_org=org, InstanceNumber=n, Rows=512, SeriesNumber=1, **common
            )
        if i == 1:
            await store(
                ctx,
                study,
                new_uid(),
                owner_org=org,
                sop_class=MRImageStorage,
                Modality="MR",
                SeriesNumber=2,
                SeriesDescription="T1 AXIAL",
                **common,
            )
    return {"studies": studies}


async def test_study_results_carry_defaults_and_computed_attributes(
    ctx: StorageContext, clinic: dict[str, Any]
) -> None:
    docs = await find(ctx, Level.STUDY)
    assert names(docs) == ["DOE^JOHN", "Döe^Jane", "SMITH^ALEX", "DOERING^Paul"]  # insertion order
    jane = docs[1]
    study = clinic["studies"][1]
    assert value(jane, "StudyInstanceUID") == study
    assert jane["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}  # ModalitiesInStudy
    assert value(jane, "NumberOfStudyRelatedSeries") == 2
    assert value(jane, "NumberOfStudyRelatedInstances") == 3
    assert value(jane, "InstanceAvailability") == "ONLINE"
    assert value(jane, "RetrieveURL") == f"{BASE}/studies/{study}"
    assert value(jane, "PatientBirthDate") == "19700101"
    assert value(jane, "StudyDescription") is None  # not a default: only with includefield
    assert "00080062" not in jane  # SOPClassesInStudy likewise
    assert list(jane) == sorted(jane)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"PatientName": "DOE^JOHN"}, ["DOE^JOHN"]),
        ({"PatientName": "doe^jane"}, ["Döe^Jane"]),
        ({"PatientName": "DOE*"}, ["DOE^JOHN", "Döe^Jane", "DOERING^Paul"]),
        ({"PatientName": "*oe^*"}, ["DOE^JOHN", "Döe^Jane"]),
        ({"PatientName": "D?E^J*"}, ["DOE^JOHN", "Döe^Jane"]),
        ({"PatientName": "*ALEX"}, ["SMITH^ALEX"]),
        ({"PatientName": "ja", "fuzzymatching": "true"}, ["Döe^Jane"]),
        ({"PatientName": "paul doe", "fuzzymatching": "true"}, ["DOERING^Paul"]),
        ({"PatientName": "paul doe", "fuzzymatching": "false"}, []),
        ({"PatientID": "PID-1"}, ["DOE^JOHN"]),
        ({"PatientID": "PID*"}, ["DOE^JOHN", "Döe^Jane", "DOERING^Paul"]),  # case-sensitive
        ({"PatientID": "PID-1\\pid-3"}, ["DOE^JOHN", "SMITH^ALEX"]),
        ({"StudyDate": "20260105"}, ["DOE^JOHN"]),
        ({"StudyDate": "20260101-20260228"}, ["DOE^JOHN", "Döe^Jane"]),
        ({"StudyDate": "-20251231"}, ["SMITH^ALEX", "DOERING^Paul"]),
        ({"StudyDate": "20251231-"}, ["DOE^JOHN", "Döe^Jane", "SMITH^ALEX"]),
        ({"StudyTime": "08-1015"}, ["DOE^JOHN", "Döe^Jane"]),
        ({"StudyTime": "12"}, ["DOERING^Paul"]),
        ({"StudyTime": "2359-"}, ["SMITH^ALEX"]),
        ({"ModalitiesInStudy": "MR"}, ["Döe^Jane"]),
        ({"ModalitiesInStudy": "MR\\US", "PatientSex": "F"}, ["Döe^Jane"]),
        ({"ModalitiesInStudy": "CT\\US", "PatientSex": "F"}, ["Döe^Jane", "DOERING^Paul"]),
        ({"SOPClassesInStudy": MRImageStorage}, ["Döe^Jane"]),
        ({"StudyDescription": "*HEAD"}, ["DOE^JOHN", "SMITH^ALEX"]),
        ({"AccessionNumber": "ACC3", "StudyDate": "1999*"}, None),
        ({"ReferringPhysicianName": "kim", "fuzzymatching": "true", "PatientID": "pid-3"}, ["SMITH^ALEX"]),
        ({"StudyID": "nope"}, []),
    ],
)
async def test_study_matching(
    ctx: StorageContext, clinic: dict[str, Any], params: dict[str, str], expected: list[str] | None
) -> None:
    if expected is None:
        with pytest.raises(BadRequestError):
            await find(ctx, Level.STUDY, params)
    else:
        assert names(await find(ctx, Level.STUDY, params)) == expected


async def test_study_uid_lists(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    a, _, c, _ = clinic["studies"]
    assert names(await find(ctx, Level.STUDY, {"StudyInstanceUID": f"{c}\\{a}"})) == [
        "DOE^JOHN",
        "SMITH^ALEX",
    ]


async def test_includefield(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    (doc,) = await find(
        ctx, Level.STUDY, {"PatientID": "PID-2", "includefield": "StudyDescription,00080062,Rows"}
    )
    assert value(doc, "StudyDescription") == "CHEST"
    assert doc["00080062"]["Value"] == [CTImageStorage, MRImageStorage]
    assert "00280010" not in doc  # instance attributes are never returned for studies
    (everything,) = await find(ctx, Level.STUDY, {"PatientID": "PID-2", "includefield": "all"})
    assert value(everything, "ReferringPhysicianName") == "REFERRER^KIM"
    assert "00080060" not in everything  # Modality is a series attribute
    (matched,) = await find(
        ctx, Level.STUDY, {"PatientID": "PID-2", "AccessionNumber": "ACC1", "StudyID": ""}
    )
    assert value(matched, "AccessionNumber") == "ACC1"


async def test_paging_is_stable_and_reports_more(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    every = names(await find(ctx, Level.STUDY))
    pages = [
        await search(ctx, parse_query(Level.STUDY, [("limit", "3"), ("offset", str(o))]), ALL, BASE)
        for o in (0, 3)
    ]
    assert [names(p.documents) for p in pages] == [every[:3], every[3:]]
    assert [p.more for p in pages] == [True, False]
    residual = await search(
        ctx, parse_query(Level.STUDY, [("PatientName", "*E*"), ("limit", "1"), ("offset", "1")]), ALL, BASE
    )
    assert names(residual.documents) == ["Döe^Jane"]
    assert residual.more


async def test_series_searches(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    jane = clinic["studies"][1]
    series = await find(ctx, Level.SERIES, study=jane, params={"includefield": "0008103E,00080021"})
    assert [value(s, "Modality") for s in series] == ["CT", "MR"]
    assert [value(s, "NumberOfSeriesRelatedInstances") for s in series] == [2, 1]
    assert value(series[1], "SeriesDescription") == "T1 AXIAL"
    assert (
        value(series[1], "RetrieveURL")
        == f"{BASE}/studies/{jane}/series/{value(series[1], 'SeriesInstanceUID')}"
    )
    assert value(series[0], "PatientName") is None  # a study's series: series attributes only
    assert [
        value(s, "SeriesNumber") for s in await find(ctx, Level.SERIES, {"SeriesNumber": "2"}, study=jane)
    ] == [2]
    # All series: study attributes too, including the computed ones, and study-level matching keys.
    everywhere = await find(ctx, Level.SERIES, {"PatientName": "d*", "Modality": "CT"})
    assert names(everywhere) == ["DOE^JOHN", "Döe^Jane", "DOERING^Paul"]
    assert value(everywhere[1], "NumberOfStudyRelatedSeries") == 2
    assert everywhere[1]["00080061"]["Value"] == ["CT", "MR"]
    assert await find(ctx, Level.SERIES, {"PatientName": "nobody*"}) == []


async def test_instance_searches(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    john = clinic["studies"][0]
    (ct,) = await find(ctx, Level.SERIES, study=john)
    series_uid = value(ct, "SeriesInstanceUID")
    instances = await find(ctx, Level.INSTANCE, study=john, series=series_uid)
    assert [value(i, "InstanceNumber") for i in instances] == [1, 2]
    assert value(instances[0], "Rows") == 512
    assert value(instances[0], "PatientName") is None
    sop = value(instances[1], "SOPInstanceUID")
    assert value(instances[1], "RetrieveURL") == f"{BASE}/studies/{john}/series/{series_uid}/instances/{sop}"
    assert [
        value(i, "SOPInstanceUID")
        for i in await find(ctx, Level.INSTANCE, {"InstanceNumber": "2"}, study=john)
    ] == [sop]
    # Study and series keys at the instance level, across studies.
    mr = await find(ctx, Level.INSTANCE, {"Modality": "MR", "PatientName": "*jane"})
    assert names(mr) == ["Döe^Jane"]
    assert value(mr[0], "NumberOfSeriesRelatedInstances") == 1
    assert value(mr[0], "NumberOfStudyRelatedInstances") == 3
    assert len(await find(ctx, Level.INSTANCE, {"SOPClassUID": CTImageStorage, "PatientID": "PID*"})) == 6
    assert await find(ctx, Level.INSTANCE, study=new_uid()) == []


async def test_access_scope_is_part_of_every_search(ctx: StorageContext, clinic: dict[str, Any]) -> None:
    a_only = AccessScope(orgs={"org-a"})
    assert names(await find(ctx, Level.STUDY, scope=a_only)) == ["DOE^JOHN", "Döe^Jane"]
    assert names(await find(ctx, Level.STUDY, {"PatientName": "*"}, scope=a_only)) == ["DOE^JOHN", "Döe^Jane"]
    assert names(await find(ctx, Level.STUDY, {"PatientName": "*OE*"}, scope=a_only)) == [
        "DOE^JOHN",
        "Döe^Jane",
    ]
    shared = AccessScope(orgs={"org-b"}, study_uids={clinic["studies"][3]})
    assert names(await find(ctx, Level.STUDY, scope=shared)) == ["SMITH^ALEX", "DOERING^Paul"]
    assert await find(ctx, Level.STUDY, scope=AccessScope()) == []
    assert await find(ctx, Level.SERIES, study=clinic["studies"][0], scope=AccessScope(orgs={"org-b"})) == []
    assert len(await find(ctx, Level.INSTANCE, {"Modality": "CT"}, scope=a_only)) == 4
    assert len(await find(ctx, Level.SERIES, {"PatientName": "D*"}, scope=shared)) == 1


async def test_a_search_that_would_decrypt_too_much_is_refused(
    ctx: StorageContext, clinic: dict[str, Any]
) -> None:
    ctx.qido = QidoLimits(scan_cap=3)
    with pytest.raises(QueryTooBroadError, match="more than 3 candidates"):
        await find(ctx, Level.STUDY, {"PatientName": "*X*"})
    # Narrowed by an indexed key, the same pattern stays within the cap.
    assert names(await find(ctx, Level.STUDY, {"PatientName": "*OE*", "StudyDate": "20260101-"})) == [
        "DOE^JOHN",
        "Döe^Jane",
    ]
    # A result page that fills before the cap is reached is answered.
    assert names(await find(ctx, Level.STUDY, {"PatientName": "*E*", "limit": "1"})) == ["DOE^JOHN"]


async def test_too_many_parent_studies_are_refused(
    ctx: StorageContext, clinic: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.storage.qido.MAX_PARENTS", 3)
    assert len(await find(ctx, Level.SERIES, {"StudyDate": "20000101-"})) == 4  # 3 studies, one has 2 series
    with pytest.raises(QueryTooBroadError, match="match more than 3 studies"):
        await find(ctx, Level.SERIES, {"StudyDate": "19000101-"})  # 4 studies to narrow by


async def test_no_phi_in_the_index_file(ctx: StorageContext, tmp_path: Path) -> None:
    canaries = {
        "PatientName": "ZEBEDEE^QUIMBY",
        "PatientID": "QPID-77123",
        "AccessionNumber": "QACC-99881",
        "StudyDescription": "QUIMBYSCAN HEAD",
        "ReferringPhysicianName": "OTTOVON^REFERRAL",
        "InstitutionName": "QUIMBY INFIRMARY",
        "StudyID": "QSTUDY42",
    }
    study = new_uid()
    await store(ctx, study, new_uid(), PatientBirthDate="19450817", **canaries)
    assert names(await find(ctx, Level.STUDY, {"PatientName": "zebedee*"})) == ["ZEBEDEE^QUIMBY"]
    needles = [*canaries.values(), "ZEBEDEE", "QUIMBY", "19450817"]
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    for needle in needles:
        for encoded in (needle.encode(), needle.lower().encode(), needle.encode("utf-16-le")):
            assert encoded not in raw, needle


async def test_search_survives_restart_and_kek_rotation(tmp_path: Path) -> None:
    settings = StorageSettings(state_dir=tmp_path / "state")
    ctx = await open_context(settings)
    try:
        study = new_uid()
        await store(ctx, study, new_uid(), PatientName="ROTA^TION")
        ctx.keyring.rotate()
        await rewrap_all(ctx.metadata, ctx.keyring)
        key = await ctx.metadata.get_index_key("qido-v1")
        assert key is not None
        assert key.kek_id == ctx.keyring.active_id
    finally:
        await ctx.close()
    again = await open_context(settings)
    try:
        assert names(await find(again, Level.STUDY, {"PatientName": "ROTA*"})) == ["ROTA^TION"]
    finally:
        await again.close()


async def test_bulk_data_markers_become_bulk_data_uris(ctx: StorageContext) -> None:
    """Instance metadata keeps bulk data as markers; a search returns them as absolute BulkDataURIs."""
    study, series = new_uid(), new_uid()
    plain = await store(ctx, study, series, PatientName="BULK^ONE", PatientID="BULK-1")
    # An instance whose metadata holds a marker, as ingest stores large binary values.
    marked_sop = new_uid()
    object_id = uuid.uuid4().hex
    kek_id, wrapped = ctx.keyring.wrap(envelope.new_data_key(), envelope.dek_context(object_id))
    await ctx.metadata.add_pending_object(object_id, WrappedKey(kek_id, wrapped), time.time())
    metadata = {
        "00080018": {"vr": "UI", "Value": [marked_sop]},
        "00420011": {"vr": "OB", "BulkDataURI": "pacs-bulk:00420011;0;2048"},
    }
    await index_instance(
        ctx,
        NewInstance(
            study_uid=study,
            series_uid=series,
            sop_uid=marked_sop,
            sop_class_uid=CTImageStorage,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            object_id=object_id,
            size=0,
            sha256=EMPTY_SHA256,
            metadata=metadata,
            frames=None,
        ),
    )

    docs = await find(ctx, Level.INSTANCE, {"includefield": "all"}, study=study, series=series)
    by_sop = {value(d, "SOPInstanceUID"): d for d in docs}
    instance = f"{BASE}/studies/{study}/series/{series}/instances/{marked_sop}"
    assert by_sop[marked_sop]["00420011"] == {"vr": "OB", "BulkDataURI": f"{instance}/bulkdata/00420011"}
    assert "00420011" not in by_sop[plain]
    assert "pacs-bulk:" not in str(docs)
    # Without includefield the marked attribute is not returned, and nothing else changes.
    (default,) = [
        d for d in await find(ctx, Level.INSTANCE, study=study) if value(d, "SOPInstanceUID") == marked_sop
    ]
    assert "00420011" not in default
    assert "pacs-bulk:" not in str(default)
