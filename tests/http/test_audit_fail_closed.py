"""Fail closed: a request that returns or changes PHI whose audit event cannot be made durable is refused.

Each mode gets a small deployment of its own (the fault must not touch the systems other tests share)
and a real fault in the one place its access events become durable:

* ``cluster``: the Kafka broker (a noida-db of its own) is stopped. Searches and retrievals publish
  their access event straight to the bus before answering, so they answer 503. A STOW's event is
  written to the metadata store's outbox in the same transaction as the instance (MongoDB is up), so
  it is durable: the instance is stored and its record reaches the log once the broker is back.
* ``embedded``: the storage process may no longer grow any file (``RLIMIT_FSIZE`` 0, what a full disk
  or an exhausted quota does to it; chmod would not stop a process that holds the file open, nor
  root). The SQLite event log refuses the access events, so searches and retrievals answer 503; the
  SQLite outbox refuses the STOW's transaction, so nothing is stored.

Refusals say why in a short message without patient data. After the repair everything answers again,
nothing stored before is lost, and the audit log verifies.
"""

from __future__ import annotations

import resource
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedded.launcher import EmbeddedSystem, find_free_base_port
from pacslib.routing import SERVICES
from scripts.identities import Account, bootstrap_admin, create_org, create_user
from tests.conftest import S3Endpoint
from tests.dicom_factory import PATIENT_NAME, ct_instance, new_uid
from tests.http.conftest import TEST_ENV
from tests.realservers import KafkaBroker

WAIT_SECONDS = 30.0
JSON = {"Accept": "application/dicom+json"}
DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
# How long storage waits for the brokers before refusing (the default, 60 s, would make this test slow).
DELIVERY_TIMEOUT_MS = 3000


@dataclass
class Small:
    """A deployment of this module's own, with a clinician and an auditor of one hospital."""

    mode: str
    system: EmbeddedSystem
    clinician: Account
    auditor: Account
    broker: KafkaBroker | None = None


def _cluster_env(s3: S3Endpoint, mongo_uri: str, bootstrap: str) -> dict[str, str]:
    database = f"pacs_{uuid.uuid4().hex[:16]}"
    bus = {
        "EVENT_BUS": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "KAFKA_TOPIC_PARTITIONS": "3",
        "KAFKA_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_DELIVERY_TIMEOUT_MS": str(DELIVERY_TIMEOUT_MS),
    }
    return {
        **{f"PACS_{svc.upper()}_{k}": v for svc in SERVICES for k, v in bus.items()},
        "PACS_STORAGE_OBJECT_STORE": "s3",
        "PACS_STORAGE_S3_ENDPOINT": s3.endpoint,
        "PACS_STORAGE_S3_ACCESS_KEY": s3.access_key,
        "PACS_STORAGE_S3_SECRET_KEY": s3.secret_key,
        "PACS_STORAGE_S3_BUCKET": f"pacs-{uuid.uuid4().hex[:16]}",
        "PACS_STORAGE_S3_SECURE": "false",
        "PACS_STORAGE_S3_REGION": "us-east-1",
        "PACS_STORAGE_METADATA_DB": "mongodb",
        "PACS_STORAGE_MONGODB_URI": mongo_uri,
        "PACS_STORAGE_MONGODB_DATABASE": database,
        "PACS_AUTH_STORE": "mongodb",
        "PACS_AUTH_MONGODB_URI": mongo_uri,
        "PACS_AUTH_MONGODB_DATABASE": f"{database}_auth",
        "PACS_AUDIT_STORE": "mongodb",
        "PACS_AUDIT_MONGODB_URI": mongo_uri,
        "PACS_AUDIT_MONGODB_DATABASE": f"{database}_audit",
    }


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Small]:
    state: Path = tmp_path_factory.mktemp(f"fail-closed-{request.param}")
    env = dict(TEST_ENV)
    broker: KafkaBroker | None = None
    if request.param == "cluster":
        broker = KafkaBroker(tmp_path_factory.mktemp("fail-closed-noida"))
        broker.start()
        env |= _cluster_env(
            request.getfixturevalue("s3_endpoint"), request.getfixturevalue("mongo_uri"), broker.bootstrap
        )
    system = EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=env)
    try:
        system.start()
        operator = bootstrap_admin(system)
        org = create_org(system, operator, "Hospital F")
        clinician = create_user(system, operator, org, "rad-f", ["radiologist"])
        auditor = create_user(system, operator, org, "aud-f", ["auditor"])
        yield Small(request.param, system, clinician, auditor, broker)
    finally:
        system.stop()
        if broker is not None:
            broker.stop()


class Fault:
    """The fault of a mode: where its access events become durable stops accepting them."""

    def __init__(self, small: Small) -> None:
        self._small = small

    def __enter__(self) -> Fault:
        if self._small.broker is not None:
            self._small.broker.stop()
        else:
            self._limit(0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._small.broker is not None:
            self._small.broker.start()  # on the same port, with the same data
        else:
            self._limit(resource.RLIM_INFINITY)

    def _limit(self, size: int) -> None:
        pid = self._small.system.pids()["storage"]
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, hard))


def _stow(small: Small, blob: bytes) -> httpx.Response:
    return httpx.post(
        f"{small.system.dicomweb_url}/studies",
        content=blob,
        headers={**small.clinician.headers, "Content-Type": "application/dicom"},
        timeout=60,
    )


def _reads(small: Small, study: str, series: str, sop: str) -> dict[str, httpx.Response]:
    """The PHI-returning requests on one instance: QIDO, WADO retrieve and metadata, a rendered view,
    and an export of its study."""
    web, headers = small.system.dicomweb_url, small.clinician.headers
    inst = f"{web}/studies/{study}/series/{series}/instances/{sop}"
    calls = {
        "qido": (f"{web}/studies?StudyInstanceUID={study}", JSON),
        "wado": (inst, DICOM),
        "metadata": (f"{web}/studies/{study}/metadata", JSON),
        "rendered": (f"{inst}/rendered", {"Accept": "image/png"}),
        "export": (f"{small.system.base_url}/export/studies/{study}", {"Accept": "application/zip"}),
    }
    return {
        name: httpx.get(url, headers={**headers, **accept}, timeout=60)
        for name, (url, accept) in calls.items()
    }


def _records(small: Small, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{small.system.base_url}/audit/events", params=params, headers=small.auditor.headers, timeout=30
    )
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["records"]
    return found


def _wait_for_record(small: Small, study: str, action: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = _records(small, study=study, action=action)
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {action} record of {study}"
        time.sleep(0.3)


def test_phi_is_refused_while_its_access_cannot_be_recorded(small: Small) -> None:
    patient = f"PID-{uuid.uuid4().hex[:10]}"
    before, series, sop_uid = new_uid(), new_uid(), new_uid()
    stored = _stow(small, ct_instance(before, series, 1, patient_id=patient, sop_uid=sop_uid))
    assert stored.status_code == 200, stored.text
    assert all(r.status_code == 200 for r in _reads(small, before, series, sop_uid).values())

    during, series2, sop2 = new_uid(), new_uid(), new_uid()
    with Fault(small):
        started = time.monotonic()
        refused = _reads(small, before, series, sop_uid)
        elapsed = time.monotonic() - started
        stow = _stow(small, ct_instance(during, series2, 1, patient_id=patient, sop_uid=sop2))
    for name, response in refused.items():
        assert response.status_code == 503, f"{name}: {response.status_code} {response.text[:200]}"
        assert response.headers["content-type"].startswith("application/json"), name
        message = response.json()["error"]
        assert "audit" in message, f"{name}: {message}"
        for secret in (patient, *(part for part in PATIENT_NAME.split("^") if len(part) > 2)):
            assert secret not in response.text, f"{name} names the patient"
    # Refusing takes at most the delivery timeout once (then the dead broker is known at once).
    assert elapsed < DELIVERY_TIMEOUT_MS / 1000 * 2 + 10

    if small.mode == "embedded":
        # The instance and its access event are one SQLite transaction: neither could be written.
        assert stow.status_code == 503, stow.text
        assert patient not in stow.text
    else:
        # The access event waited in the MongoDB outbox (same transaction as the instance).
        assert stow.status_code == 200, stow.text

    # Repaired: everything answers again; what was stored before the fault is all there.
    deadline = time.monotonic() + WAIT_SECONDS
    while (answers := _reads(small, before, series, sop_uid)) and any(
        r.status_code != 200 for r in answers.values()
    ):
        assert time.monotonic() < deadline, {n: r.status_code for n, r in answers.items()}
        time.sleep(0.5)
    assert answers["qido"].json()[0]["0020000D"]["Value"] == [before]
    assert answers["metadata"].json()[0]["00100020"]["Value"] == [patient]
    again = httpx.get(
        f"{small.system.dicomweb_url}/studies/{during}/metadata",
        headers={**small.clinician.headers, **JSON},
        timeout=30,
    )
    if small.mode == "embedded":
        assert again.status_code == 404, "an instance was stored although its access event was not"
        assert (
            _stow(small, ct_instance(during, series2, 1, patient_id=patient, sop_uid=sop2)).status_code == 200
        )
    else:
        assert again.status_code == 200, again.text
    stored_record = _wait_for_record(small, during, "pacs.storage.stored")
    assert stored_record["which"]["sop_uid"] == sop2
    assert stored_record["who"]["user"] == small.clinician.user_id
    _wait_for_record(small, before, "pacs.storage.retrieved")

    verify = httpx.get(f"{small.system.base_url}/audit/verify", headers=small.auditor.headers, timeout=60)
    assert verify.status_code == 200, verify.text
    assert verify.json()["ok"] is True, verify.json()
