"""QIDO-RS end to end: dicomweb-client searches, OHIF's request shapes, errors, and no PHI at rest.

Runs in both deployment modes. Every study here carries a random family name and patient ID prefix,
so results are checked exactly even though other tests share the deployment.
"""

from __future__ import annotations

import io
import random
import string
from pathlib import Path
from typing import Any

import pydicom
import pytest
from bson import BSON
from dicomweb_client.api import DICOMwebClient
from pymongo import MongoClient
from pymongo.database import Database

from embedded.launcher import EmbeddedSystem
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

JSON = "application/dicom+json"


def _client(system: EmbeddedSystem) -> DICOMwebClient:
    return DICOMwebClient(url=system.dicomweb_url, headers=dict(api.DEFAULT_HEADERS))


def _value(doc: dict[str, Any], tag: str) -> Any:
    values = doc.get(tag, {}).get("Value", [])
    first = values[0] if values else None
    return first["Alphabetic"] if isinstance(first, dict) else first


def _dataset(study: str, series: str, number: int, **attributes: Any) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(ct_instance(study, series, number)))
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def _marker(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(8))


@pytest.fixture(scope="module")
def corpus(system: EmbeddedSystem) -> dict[str, Any]:
    """Five studies of five patients sharing a random family name; the first has a CT and an MR series."""
    rng = random.Random()
    family, pid = _marker(rng), f"Q{_marker(rng)}"
    givens = ["ANNA", "BORIS", "CLARA", "DMITRI", "EMIL"]
    studies: list[dict[str, Any]] = []
    datasets = []
    for i, given in enumerate(givens):
        study, series = new_uid(), new_uid()
        common = {
            "PatientName": f"{family}^{given}",
            "PatientID": f"{pid}-{i}",
            "StudyDate": f"2024{i + 1:02d}15",
            "StudyDescription": f"STUDY {i}",
            "AccessionNumber": f"{pid}A{i}",
        }
        series_uids = [series]
        studies.append({"uid": study, "series": series_uids, **common})
        datasets += [_dataset(study, series, n, **common) for n in (1, 2)]
        if i == 0:
            mr = new_uid()
            series_uids.append(mr)
            datasets.append(
                _dataset(study, mr, 1, Modality="MR", SeriesDescription="T2 AX", SeriesNumber=2, **common)
            )
    result = _client(system).store_instances(datasets)
    assert "FailedSOPSequence" not in result
    return {"family": family, "pid": pid, "studies": studies}


def test_search_for_studies_by_patient_id(system: EmbeddedSystem, corpus: dict[str, Any]) -> None:
    first = corpus["studies"][0]
    (doc,) = _client(system).search_for_studies(search_filters={"PatientID": first["PatientID"]})
    assert _value(doc, "0020000D") == first["uid"]
    assert _value(doc, "00100010") == first["PatientName"]
    assert doc["00080061"]["Value"] == ["CT", "MR"]  # ModalitiesInStudy
    assert _value(doc, "00201206") == 2  # NumberOfStudyRelatedSeries
    assert _value(doc, "00201208") == 3  # NumberOfStudyRelatedInstances
    # dicomweb-client sends "Host: <host>" without the port, and RetrieveURL follows the Host header.
    assert _value(doc, "00081190").endswith(f"/dicom-web/studies/{first['uid']}")


def test_wildcards_ranges_and_keywords_or_tags(system: EmbeddedSystem, corpus: dict[str, Any]) -> None:
    client = _client(system)
    family, studies = corpus["family"], corpus["studies"]
    every = [s["uid"] for s in studies]
    by_prefix = client.search_for_studies(search_filters={"PatientName": f"{family}*"})
    assert [_value(d, "0020000D") for d in by_prefix] == every
    by_range = client.search_for_studies(
        search_filters={"00100010": f"{family}*", "StudyDate": "20240201-20240415"}
    )
    assert [_value(d, "0020000D") for d in by_range] == every[1:4]
    open_ended = client.search_for_studies(
        search_filters={"PatientID": f"{corpus['pid']}*", "StudyDate": "20240415-"}
    )
    assert [_value(d, "0020000D") for d in open_ended] == every[3:]
    uid_list = client.search_for_studies(search_filters={"StudyInstanceUID": f"{every[4]}\\{every[0]}"})
    assert [_value(d, "0020000D") for d in uid_list] == [every[0], every[4]]
    contains = client.search_for_studies(search_filters={"PatientName": f"*{family[2:6].lower()}*^c*"})
    assert [_value(d, "0020000D") for d in contains] == [every[2]]


def test_fuzzymatching_fields_and_paging(system: EmbeddedSystem, corpus: dict[str, Any]) -> None:
    client = _client(system)
    pid = corpus["pid"]
    fuzzy = client.search_for_studies(
        fuzzymatching=True,
        search_filters={"PatientName": "dmi", "PatientID": f"{pid}*"},
        fields=["StudyDescription", "00080062"],
    )
    assert [_value(d, "00100010") for d in fuzzy] == [corpus["studies"][3]["PatientName"]]
    assert _value(fuzzy[0], "00081030") == "STUDY 3"
    assert _value(fuzzy[0], "00080062") == "1.2.840.10008.5.1.4.1.1.2"
    strict = client.search_for_studies(
        fuzzymatching=False, search_filters={"PatientName": "dmi", "PatientID": f"{pid}*"}
    )
    assert strict == []
    pages = [
        client.search_for_studies(search_filters={"PatientID": f"{pid}*"}, limit=2, offset=offset)
        for offset in (0, 2, 4, 6)
    ]
    assert [len(p) for p in pages] == [2, 2, 1, 0]
    assert [_value(d, "0020000D") for p in pages for d in p] == [s["uid"] for s in corpus["studies"]]


def test_series_and_instances(system: EmbeddedSystem, corpus: dict[str, Any]) -> None:
    client = _client(system)
    first = corpus["studies"][0]
    series = client.search_for_series(first["uid"])
    assert [_value(s, "0020000E") for s in series] == first["series"]
    assert [_value(s, "00201209") for s in series] == [2, 1]  # NumberOfSeriesRelatedInstances
    mr = client.search_for_series(search_filters={"Modality": "MR", "PatientID": f"{corpus['pid']}*"})
    assert [_value(s, "0020000E") for s in mr] == [first["series"][1]]
    assert _value(mr[0], "00100010") == first["PatientName"]  # all series: study attributes too
    instances = client.search_for_instances(first["uid"], first["series"][0], fields=["Rows"])
    assert [_value(i, "00200013") for i in instances] == [1, 2]
    assert _value(instances[0], "00280010") == 32
    retrieve = f"/dicom-web/studies/{first['uid']}/series/{first['series'][0]}/instances/"
    assert retrieve in _value(instances[1], "00081190")
    in_study = client.search_for_instances(first["uid"], search_filters={"InstanceNumber": "1"})
    assert len(in_study) == 2
    across = client.search_for_instances(search_filters={"PatientName": f"{corpus['family']}^E*"})
    assert {_value(i, "0020000D") for i in across} == {corpus["studies"][4]["uid"]}


def test_ohif_request_shapes(system: EmbeddedSystem, corpus: dict[str, Any]) -> None:
    family = corpus["family"]
    url = (
        f"{system.dicomweb_url}/studies?limit=101&offset=0&fuzzymatching=false"
        f"&includefield=00081030%2C00080060&PatientName=%2A{family}%2A"
    )
    response = api.get(url, headers={"Accept": JSON}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(JSON)
    assert response.headers["cache-control"] == "no-store"
    docs = response.json()
    assert [_value(d, "0020000D") for d in docs] == [s["uid"] for s in corpus["studies"]]
    assert _value(docs[0], "00081030") == "STUDY 0"
    assert _value(docs[0], "00081190") == f"{system.dicomweb_url}/studies/{corpus['studies'][0]['uid']}"
    first = corpus["studies"][0]
    series = api.get(
        f"{system.dicomweb_url}/studies/{first['uid']}/series?includefield=0008103E,00080021",
        headers={"Accept": "application/dicom+json, application/json, */*"},
        timeout=30,
    )
    assert series.status_code == 200, series.text
    assert [_value(s, "0008103E") for s in series.json()] == [None, "T2 AX"]
    encoded = api.get(
        f"{system.dicomweb_url}/studies?PatientName={family}%5EBORIS&includefield=all",
        headers={"Accept": JSON},
        timeout=30,
    )
    assert [_value(d, "00100020") for d in encoded.json()] == [corpus["studies"][1]["PatientID"]]


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        ("PatientNme=DOE", 400, "PatientNme"),
        ("limit=abc", 400, "limit"),
        ("offset=-5", 400, "offset"),
        ("StudyDate=2024", 400, "StudyDate"),
        ("Rows=512", 400, "not a supported matching key"),
        ("includefield=Nope", 400, "Nope"),
        ("SOPInstanceUID=1.2.3", 400, "instance-level"),
    ],
)
def test_bad_queries_say_what_is_wrong(
    system: EmbeddedSystem, query: str, status: int, fragment: str
) -> None:
    response = api.get(f"{system.dicomweb_url}/studies?{query}", headers={"Accept": JSON}, timeout=30)
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_negotiation_and_empty_results(system: EmbeddedSystem) -> None:
    base = system.dicomweb_url
    xml = api.get(
        f"{base}/studies", headers={"Accept": "multipart/related; type=application/dicom+xml"}, timeout=30
    )
    assert xml.status_code == 406
    nothing = api.get(f"{base}/studies?PatientID=NO-SUCH-PATIENT-{new_uid()}", timeout=30)
    assert nothing.status_code == 200
    assert nothing.json() == []
    assert nothing.headers["cache-control"] == "no-store"
    assert api.get(f"{base}/studies/not-a-uid/series", timeout=30).status_code == 400
    assert api.get(f"{base}/studies/{new_uid()}/series/{new_uid()}/instances", timeout=30).json() == []


def test_no_phi_in_clear_after_indexing(deployment: Deployment) -> None:
    system = deployment.system
    rng = random.Random()
    canaries = {
        "PatientName": f"QC{_marker(rng)}^ZEBEDEE",
        "PatientID": f"QCID-{_marker(rng)}",
        "AccessionNumber": f"QCACC{_marker(rng)}",
        "StudyDescription": f"QCDESC {_marker(rng)}",
        "ReferringPhysicianName": f"QCREF{_marker(rng)}^OTTO",
        "InstitutionName": f"QCINST {_marker(rng)}",
        "StudyID": f"QS{_marker(rng)}",
    }
    ds = _dataset(new_uid(), new_uid(), 1, **canaries)
    _client(system).store_instances([ds])
    family = canaries["PatientName"].split("^")[0]
    found = _client(system).search_for_studies(search_filters={"PatientName": f"{family.lower()}*"})
    assert [_value(d, "00100020") for d in found] == [canaries["PatientID"]]  # indexed and searchable
    needles = [v.encode(enc) for v in canaries.values() for enc in ("utf-8", "utf-16-le")]
    needles += [v.lower().encode() for v in canaries.values()] + [family.encode()]
    for where, data in _index_bytes(deployment):
        for needle in needles:
            assert needle not in data, f"PHI found in clear in {where}"


def _index_bytes(deployment: Deployment) -> list[tuple[str, bytes]]:
    """The metadata index as stored: every file of the state folder, or every MongoDB document."""
    if deployment.mode == "embedded":
        files = [p for p in Path(deployment.system.state_dir).rglob("*") if p.is_file()]
        assert any(p.name == "storage.db" for p in files)
        return [(str(p), p.read_bytes()) for p in files]
    out: list[tuple[str, bytes]] = []
    mongo: MongoClient[dict[str, Any]]
    with MongoClient(deployment.mongo_uri) as mongo:
        db: Database[dict[str, Any]] = mongo[str(deployment.database)]
        for name in db.list_collection_names():
            out += [(f"mongodb:{name}", BSON.encode(doc)) for doc in db[name].find()]
    assert any(where == "mongodb:qido_studies" for where, _ in out)
    return out
