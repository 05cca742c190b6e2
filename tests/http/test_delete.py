"""DELETE of studies, series and instances through the whole system, in both deployment modes.

Who may delete (administrators of the owning organization only; anyone else 401/403/404), and what a
delete leaves behind: nothing retrievable, nothing searchable, no blob, no data key (crypto-erasure),
the remaining study searchable as if the deleted instances had never been stored, an audit event on
the bus, and the same instances storable again.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from pacslib.events import TOPIC_AUDIT, Event
from scripts.identities import Account, create_user
from services.storage.context import build_metadata_store, build_object_store
from services.storage.objects import object_key
from services.storage.ports import InstanceRecord, WrappedKey
from services.storage.settings import StorageSettings
from tests import multipart_util
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

STUDY_DESCRIPTION = "00081030"
MODALITIES_IN_STUDY = "00080061"
SERIES_IN_STUDY = "00201206"
INSTANCES_IN_STUDY = "00201208"
SOP_INSTANCE_UID = "00080018"
OCTETS = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@dataclass(frozen=True)
class Stored:
    """One stored instance: its bytes and UIDs."""

    blob: bytes
    study: str
    series: str
    sop: str


def _dataset(blob: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(blob))


def _encode(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def make(
    study: str, series: str, number: int, *, modality: str = "CT", description: str | None = None
) -> Stored:
    """A small instance of ``study``/``series`` (an MR one when ``modality`` is MR)."""
    ds = _dataset(ct_instance(study, series, number))
    if modality == "MR":
        ds.Modality = "MR"
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    if description is not None:
        ds.StudyDescription = description
    return Stored(_encode(ds), study, series, str(ds.SOPInstanceUID))


def stow(deployment: Deployment, instances: list[Stored], account: str = "clinician_a") -> None:
    body, content_type = multipart_util.encode([i.blob for i in instances])
    r = api.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": content_type, **deployment.accounts[account].headers},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def url(deployment: Deployment, study: str, series: str | None = None, sop: str | None = None) -> str:
    out = f"{deployment.system.dicomweb_url}/studies/{study}"
    if series is not None:
        out += f"/series/{series}"
    if sop is not None:
        out += f"/instances/{sop}"
    return out


def delete(target: str, account: Account) -> httpx.Response:
    return api.request("DELETE", target, headers=account.headers, timeout=60)


def studies(deployment: Deployment, **params: str) -> list[dict[str, Any]]:
    """QIDO-RS study search as hospital A's radiologist."""
    r = api.get(f"{deployment.system.dicomweb_url}/studies", params=params, timeout=60)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()
    return found


def value(doc: dict[str, Any], tag: str) -> list[Any]:
    found: list[Any] = doc.get(tag, {}).get("Value", [])
    return found


# -- direct looks at the stores ------------------------------------------------------------------
def _settings(deployment: Deployment) -> StorageSettings:
    kwargs: dict[str, object] = {"state_dir": deployment.system.state_dir}
    if deployment.mode == "cluster":
        assert deployment.s3 is not None
        kwargs.update(
            object_store="s3",
            s3_endpoint=deployment.s3.endpoint,
            s3_access_key=deployment.s3.access_key,
            s3_secret_key=deployment.s3.secret_key,
            s3_bucket=deployment.bucket,
            s3_secure=False,
            metadata_db="mongodb",
            mongodb_uri=deployment.mongo_uri,
            mongodb_database=deployment.database,
        )
    return StorageSettings(**kwargs)  # type: ignore[arg-type]


def records_of(deployment: Deployment, study: str) -> list[InstanceRecord]:
    async def read() -> list[InstanceRecord]:
        store = build_metadata_store(_settings(deployment))
        await store.init()
        try:
            return await store.list_instances(study)
        finally:
            await store.close()

    return asyncio.run(read())


def traces(deployment: Deployment, object_ids: list[str]) -> list[tuple[WrappedKey | None, int | None]]:
    """For each object: its data-key row and its blob's size (None, None once it is erased)."""

    async def read() -> list[tuple[WrappedKey | None, int | None]]:
        settings = _settings(deployment)
        metadata = build_metadata_store(settings)
        objects = build_object_store(settings)
        await metadata.init()
        try:
            return [(await metadata.get_data_key(o), await objects.size(object_key(o))) for o in object_ids]
        finally:
            await metadata.close()
            await objects.close()

    return asyncio.run(read())


def audit_event(deployment: Deployment, matches: Callable[[Event], bool]) -> Event:
    """The first event on the audit topic that ``matches`` (waiting for the outbox relay)."""
    found = deployment.find_events(TOPIC_AUDIT, matches)
    assert found, "no such audit event"
    return found[0]


@pytest.fixture(scope="module")
def admin_b(deployment: Deployment) -> Account:
    """An administrator of hospital B (the deployment only has one for hospital A)."""
    org_b = deployment.accounts["clinician_b"].org_id
    return create_user(
        deployment.system, deployment.accounts["operator"], org_b, f"adm-b-{uuid.uuid4().hex[:8]}", ["admin"]
    )


@pytest.fixture
def study(deployment: Deployment) -> list[Stored]:
    """A study of hospital A: a CT series of two instances and an MR series of one."""
    uid, ct, mr = new_uid(), new_uid(), new_uid()
    instances = [make(uid, ct, 1), make(uid, ct, 2), make(uid, mr, 3, modality="MR")]
    stow(deployment, instances)
    return instances


# -- who may delete ------------------------------------------------------------------------------
def test_only_an_administrator_of_the_owning_organization_may_delete(
    deployment: Deployment, study: list[Stored], admin_b: Account
) -> None:
    first = study[0]
    targets = [
        url(deployment, first.study),
        url(deployment, first.study, first.series),
        url(deployment, first.study, first.series, first.sop),
    ]
    missing = url(deployment, new_uid())
    accounts = deployment.accounts
    for target in targets:
        assert httpx.request("DELETE", target).status_code == 401
        bad = httpx.request("DELETE", target, headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401
        for role in ("clinician_a", "referrer_a", "auditor_a"):
            r = delete(target, accounts[role])
            assert r.status_code == 403, (role, r.text)
            assert r.json()["error"]
        # Administrators of another organization (the operator's too) cannot tell it from a missing one.
        for stranger in (accounts["operator"], admin_b):
            r = delete(target, stranger)
            assert r.status_code == 404, r.text
            level = "instance" if target == targets[2] else "series" if target == targets[1] else "study"
            assert r.json() == {"error": f"no such {level}"}
    assert delete(missing, admin_b).json() == delete(targets[0], admin_b).json()
    assert delete(missing, accounts["admin_a"]).status_code == 404

    # Nothing was deleted by the refused attempts.
    r = api.get(targets[0], headers={"Accept": "multipart/related; type=application/dicom"}, timeout=60)
    assert r.status_code == 200
    assert len(multipart_util.decode(r.content, r.headers["content-type"])) == 3
    refused = audit_event(
        deployment,
        lambda e: (
            e.type == "pacs.storage.delete.denied"
            and e.data.get("study_uid") == first.study
            and e.data["actor"]["sub"] == admin_b.user_id
        ),
    )
    assert refused.data["actor"]["org"] == admin_b.org_id
    assert refused.data["status"] == 404

    assert delete(targets[0], accounts["admin_a"]).status_code == 204
    assert delete(targets[0], accounts["admin_a"]).status_code == 404  # gone now


# -- what a delete leaves behind -----------------------------------------------------------------
def test_deleting_a_study_erases_it_everywhere_and_it_can_be_stored_again(
    deployment: Deployment, study: list[Stored]
) -> None:
    first = study[0]
    object_ids = sorted(r.object_id for r in records_of(deployment, first.study))
    assert len(object_ids) == 3
    assert all(key is not None and size for key, size in traces(deployment, object_ids))
    admin = deployment.accounts["admin_a"]

    r = delete(url(deployment, first.study), admin)

    assert r.status_code == 204, r.text
    assert r.content == b""
    study_url = url(deployment, first.study)
    instance_url = url(deployment, first.study, first.series, first.sop)
    for target, accept in (
        (study_url, "multipart/related; type=application/dicom"),
        (f"{study_url}/metadata", "application/dicom+json"),
        (instance_url, "multipart/related; type=application/dicom"),
        (f"{instance_url}/metadata", "application/dicom+json"),
        (f"{instance_url}/frames/1", OCTETS),
    ):
        assert api.get(target, headers={"Accept": accept}, timeout=60).status_code == 404, target
    assert studies(deployment, StudyInstanceUID=first.study) == []
    assert studies(deployment, PatientID=PATIENT_ID, StudyInstanceUID=first.study) == []
    assert records_of(deployment, first.study) == []
    # Crypto-erasure: the data-key rows are gone, and so are the blobs.
    assert traces(deployment, object_ids) == [(None, None)] * 3

    event = audit_event(
        deployment, lambda e: e.type == "pacs.storage.deleted" and e.data.get("study_uid") == first.study
    )
    assert event.source == "storage"
    assert event.subject == first.study
    assert event.data["actor"] == {
        "sub": admin.user_id,
        "org": admin.org_id,
        "kind": "user",
        "roles": ["admin"],
    }
    assert (event.data["level"], event.data["instances"], event.data["owner_org"]) == (
        "study",
        3,
        admin.org_id,
    )
    body = event.model_dump_json()
    assert PATIENT_NAME not in body
    assert PATIENT_ID not in body

    # The same instances can be stored again by the owner, and are whole again.
    stow(deployment, study)
    (found,) = studies(deployment, StudyInstanceUID=first.study)
    assert (value(found, SERIES_IN_STUDY), value(found, INSTANCES_IN_STUDY)) == ([2], [3])
    r = api.get(instance_url, headers={"Accept": "multipart/related; type=application/dicom"}, timeout=60)
    assert r.status_code == 200
    assert _dataset(multipart_util.decode(r.content, r.headers["content-type"])[0][1]).SOPInstanceUID == (
        first.sop
    )


def test_deleting_a_series_updates_what_the_study_search_shows(
    deployment: Deployment, study: list[Stored]
) -> None:
    ct, mr = study[0], study[2]
    mr_objects = [r.object_id for r in records_of(deployment, mr.study) if r.series_uid == mr.series]
    (before,) = studies(deployment, StudyInstanceUID=ct.study)
    assert value(before, MODALITIES_IN_STUDY) == ["CT", "MR"]
    assert studies(deployment, StudyInstanceUID=ct.study, ModalitiesInStudy="MR") != []

    r = delete(url(deployment, mr.study, mr.series), deployment.accounts["admin_a"])

    assert r.status_code == 204, r.text
    (after,) = studies(deployment, StudyInstanceUID=ct.study)
    assert value(after, MODALITIES_IN_STUDY) == ["CT"]
    assert (value(after, SERIES_IN_STUDY), value(after, INSTANCES_IN_STUDY)) == ([1], [2])
    assert studies(deployment, StudyInstanceUID=ct.study, ModalitiesInStudy="MR") == []
    assert studies(deployment, StudyInstanceUID=ct.study, ModalitiesInStudy="CT") != []
    series = api.get(f"{url(deployment, ct.study)}/series", timeout=60).json()
    assert [value(s, "0020000E") for s in series] == [[ct.series]]
    accept = {"Accept": "multipart/related; type=application/dicom"}
    assert api.get(url(deployment, mr.study, mr.series), headers=accept, timeout=60).status_code == 404
    r = api.get(url(deployment, ct.study, ct.series), headers=accept, timeout=60)
    assert r.status_code == 200
    assert len(multipart_util.decode(r.content, r.headers["content-type"])) == 2
    assert traces(deployment, mr_objects) == [(None, None)]
    event = audit_event(
        deployment,
        lambda e: e.type == "pacs.storage.deleted" and e.data.get("series_uid") == mr.series,
    )
    assert (event.data["level"], event.data["instances"]) == ("series", 1)


def test_deleting_the_first_instance_leaves_the_study_as_the_others_describe_it(
    deployment: Deployment,
) -> None:
    """The study row came from the first instance (sealed with its key): it is rebuilt from the rest."""
    uid, series = new_uid(), new_uid()
    first = make(uid, series, 1, description="ALPHA FIRST")
    rest = [make(uid, series, 2, description="BETA LATER"), make(uid, series, 3, description="BETA LATER")]
    stow(deployment, [first])
    stow(deployment, rest)
    (before,) = studies(deployment, StudyInstanceUID=uid, includefield="StudyDescription")
    assert value(before, STUDY_DESCRIPTION) == ["ALPHA FIRST"]
    first_object = next(r.object_id for r in records_of(deployment, uid) if r.sop_uid == first.sop)

    r = delete(url(deployment, uid, series, first.sop), deployment.accounts["admin_a"])

    assert r.status_code == 204, r.text
    (after,) = studies(deployment, StudyInstanceUID=uid, includefield="StudyDescription")
    assert value(after, STUDY_DESCRIPTION) == ["BETA LATER"]
    assert value(after, INSTANCES_IN_STUDY) == [2]
    assert studies(deployment, StudyInstanceUID=uid, StudyDescription="ALPHA*") == []
    assert studies(deployment, StudyInstanceUID=uid, StudyDescription="BETA*") != []
    instances = api.get(f"{url(deployment, uid)}/instances", timeout=60).json()
    assert sorted(value(i, SOP_INSTANCE_UID)[0] for i in instances) == sorted(i.sop for i in rest)
    gone = url(deployment, uid, series, first.sop)
    assert api.get(f"{gone}/frames/1", headers={"Accept": OCTETS}, timeout=60).status_code == 404
    kept = url(deployment, uid, series, rest[0].sop)
    assert api.get(f"{kept}/frames/1", headers={"Accept": OCTETS}, timeout=60).status_code == 200
    assert traces(deployment, [first_object]) == [(None, None)]
    event = audit_event(
        deployment, lambda e: e.type == "pacs.storage.deleted" and e.data.get("sop_uid") == first.sop
    )
    assert (event.data["level"], event.data["instances"]) == ("instance", 1)

    # Stored again, the instance is back (it is the study's last instance now, not its first).
    stow(deployment, [first])
    (again,) = studies(deployment, StudyInstanceUID=uid, includefield="StudyDescription")
    assert value(again, INSTANCES_IN_STUDY) == [3]
    assert value(again, STUDY_DESCRIPTION) == ["BETA LATER"]
    assert api.get(f"{gone}/frames/1", headers={"Accept": OCTETS}, timeout=60).status_code == 200
