"""Encryption at rest, end to end: no PHI in clear anywhere, tampering detected, KEK rotation."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from bson import BSON
from minio import Minio
from pymongo import MongoClient
from pymongo.database import Database

from embedded.launcher import EmbeddedSystem
from services.storage.context import build_metadata_store
from services.storage.objects import object_key
from services.storage.ports import InstanceRecord
from services.storage.settings import StorageSettings
from tests import multipart_util
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CANARIES = [PATIENT_NAME.encode(), PATIENT_ID.encode(), b"CANARY"]


def _needles() -> list[bytes]:
    out = []
    for c in CANARIES:
        out += [c, c.lower(), c.decode().encode("utf-16-le")]
    return out


def _stow(system: EmbeddedSystem, blobs: list[bytes]) -> None:
    body, content_type = multipart_util.encode(blobs)
    r = api.post(
        f"{system.dicomweb_url}/studies", content=body, headers={"Content-Type": content_type}, timeout=60
    )
    assert r.status_code == 200, r.text


def _uids(blob: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _get(system: EmbeddedSystem, blob: bytes) -> httpx.Response:
    study, series, sop = _uids(blob)
    return api.get(
        f"{system.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": AS_STORED},
        timeout=60,
    )


def _instance_bytes(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    return multipart_util.decode(response.content, response.headers["content-type"])[0][1]


def _settings(dep: Deployment) -> StorageSettings:
    kwargs: dict[str, object] = {"state_dir": dep.system.state_dir}
    if dep.mode == "cluster":
        assert dep.s3 is not None
        kwargs.update(
            object_store="s3",
            s3_endpoint=dep.s3.endpoint,
            s3_access_key=dep.s3.access_key,
            s3_secret_key=dep.s3.secret_key,
            s3_bucket=dep.bucket,
            s3_secure=False,
            metadata_db="mongodb",
            mongodb_uri=dep.mongo_uri,
            mongodb_database=dep.database,
        )
    return StorageSettings(**kwargs)  # type: ignore[arg-type]


def _record(dep: Deployment, blob: bytes) -> InstanceRecord:
    async def lookup() -> InstanceRecord | None:
        store = build_metadata_store(_settings(dep))
        await store.init()
        try:
            return await store.get_instance(*_uids(blob))
        finally:
            await store.close()

    record = asyncio.run(lookup())
    assert record is not None
    return record


def _minio(dep: Deployment) -> Minio:
    assert dep.s3 is not None
    return Minio(dep.s3.endpoint, dep.s3.access_key, dep.s3.secret_key, secure=False, region="us-east-1")


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


def _stored_blobs(dep: Deployment, tmp_root: Path) -> Iterator[tuple[str, bytes]]:
    """Every byte this deployment has written anywhere, as (where, bytes)."""
    for path in _files(dep.system.state_dir):
        yield str(path), path.read_bytes()
    if dep.mode == "cluster":
        client = _minio(dep)
        assert dep.bucket is not None
        for obj in client.list_objects(dep.bucket, recursive=True):
            response = client.get_object(dep.bucket, obj.object_name)
            try:
                yield f"s3://{dep.bucket}/{obj.object_name}", response.read()
            finally:
                response.close()
                response.release_conn()
        # The S3 server's own files on disk (JuiceFS chunks and metadata) and the MongoDB documents.
        for folder in tmp_root.glob("juicefs*"):
            for path in _files(folder):
                yield str(path), path.read_bytes()
        mongo: MongoClient[dict[str, Any]]
        with MongoClient(dep.mongo_uri) as mongo:
            db: Database[dict[str, Any]] = mongo[str(dep.database)]
            for name in db.list_collection_names():
                for doc in db[name].find():
                    yield f"mongodb:{name}", BSON.encode(doc)


def test_no_phi_in_clear_in_any_stored_byte(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    system = deployment.system
    study = new_uid()
    blobs = [ct_instance(study, new_uid(), n, rows=64, columns=64) for n in range(1, 4)]
    _stow(system, blobs)
    # The data really is there, and readable through the API.
    meta = api.get(f"{system.dicomweb_url}/studies/{study}/metadata", timeout=30).json()
    assert meta[0]["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert meta[0]["00100020"]["Value"] == [PATIENT_ID]
    time.sleep(1.5)  # let the outbox relay publish to the event log
    needles = _needles()
    scanned = 0
    for where, data in _stored_blobs(deployment, tmp_path_factory.getbasetemp()):
        scanned += len(data)
        for needle in needles:
            assert needle not in data, f"PHI found in clear in {where}"
    assert scanned > sum(len(b) for b in blobs)


def test_flipped_ciphertext_byte_is_an_integrity_error(deployment: Deployment) -> None:
    system = deployment.system
    blob = ct_instance(new_uid(), new_uid(), 1, rows=64, columns=64)
    _stow(system, [blob])
    assert _instance_bytes(_get(system, blob)) == blob
    key = object_key(_record(deployment, blob).object_id)
    if deployment.mode == "embedded":
        path = system.state_dir / "objects" / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        client = _minio(deployment)
        assert deployment.bucket is not None
        response = client.get_object(deployment.bucket, key)
        data = bytearray(response.read())
        response.close()
        response.release_conn()
        data[len(data) // 2] ^= 0x01
        client.put_object(deployment.bucket, key, io.BytesIO(bytes(data)), len(data))
    tampered = _get(system, blob)
    assert tampered.status_code == 500
    assert "integrity" in tampered.json()["error"]
    assert PATIENT_NAME not in tampered.text


def _kek(system: EmbeddedSystem, dep: Deployment, command: str) -> str:
    env = system.environment()
    env.update(
        {f"PACS_STORAGE_{k.upper()}": str(v) for k, v in _settings(dep).model_dump().items() if v is not None}
    )
    for secret in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "MONGODB_URI"):
        value = getattr(_settings(dep), secret.lower())
        if value is not None:
            env[f"PACS_STORAGE_{secret}"] = value.get_secret_value()
    done = subprocess.run(
        [sys.executable, "-m", "services.storage.kek", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_objects_written_before_kek_rotation_still_read(deployment: Deployment) -> None:
    system = deployment.system
    before = ct_instance(new_uid(), new_uid(), 1)
    _stow(system, [before])
    old_kek = _kek(system, deployment, "status").split("active KEK: ")[1].split()[0]
    out = _kek(system, deployment, "rotate")
    new_kek = out.split("new active KEK: ")[1].split()[0]
    assert new_kek != old_kek
    time.sleep(1.1)  # the running service notices the changed keyring file
    after = ct_instance(new_uid(), new_uid(), 2)
    _stow(system, [after])
    assert _instance_bytes(_get(system, before)) == before
    assert _instance_bytes(_get(system, after)) == after

    def kek_of(blob: bytes) -> str:
        async def lookup() -> str:
            store = build_metadata_store(_settings(deployment))
            await store.init()
            try:
                record = await store.get_instance(*_uids(blob))
                assert record is not None
                key = await store.get_data_key(record.object_id)
                assert key is not None
                return key.kek_id
            finally:
                await store.close()

        return asyncio.run(lookup())

    assert kek_of(before) == old_kek
    assert kek_of(after) == new_kek
    blob_before = _object_bytes(deployment, _record(deployment, before).object_id)
    rewrapped = _kek(system, deployment, "rewrap")
    assert int(rewrapped.split("re-wrapped ")[1].split()[0]) >= 1
    assert kek_of(before) == new_kek
    # Re-wrapping rewrote the key row only: the stored object is byte-for-byte unchanged.
    assert _object_bytes(deployment, _record(deployment, before).object_id) == blob_before
    assert _instance_bytes(_get(system, before)) == before


def _object_bytes(dep: Deployment, object_id: str) -> bytes:
    key = object_key(object_id)
    if dep.mode == "embedded":
        return (dep.system.state_dir / "objects" / key).read_bytes()
    assert dep.bucket is not None
    response = _minio(dep).get_object(dep.bucket, key)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()
