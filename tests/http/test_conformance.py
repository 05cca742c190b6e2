"""docs/conformance.md stays true: its checked tables are parsed and compared with the running system
(resources, matching keys) and with the code that answers (failure reasons, transfer syntaxes)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pydicom
import pytest

from pacslib import dicom_media
from services.storage.frames import natural_media_type
from services.storage.ports import Level
from services.storage.qido_attributes import MatchKind, keys_at
from services.storage.transcode import can_decode
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http.conftest import Deployment

DOC = Path(__file__).parents[2] / "docs" / "conformance.md"
MATCHING = {
    MatchKind.UID: "UID list",
    MatchKind.DATE: "date, range",
    MatchKind.TIME: "time, range",
    MatchKind.DATETIME: "date-time, range",
    MatchKind.TEXT: "text, wildcard",
    MatchKind.CODE: "code, list",
    MatchKind.NAME: "person name, wildcard, fuzzy",
    MatchKind.NUMBER: "number",
}
LEVEL_PATH = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}


def table(heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after ``### heading``/``## heading``, as column -> cell."""
    text = DOC.read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n", text, flags=re.M)
    assert match, f"no section {heading!r} in {DOC.name}"
    block: list[str] = []
    for line in text[match.end() :].splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    assert len(block) > 2, f"no table under {heading!r}"

    def cells(line: str) -> list[str]:
        return [c.strip().strip("`") for c in line.strip().strip("|").split("|")]

    header = cells(block[0])
    return [dict(zip(header, cells(line), strict=True)) for line in block[2:]]


def test_resources_answer_as_the_table_says(deployment: Deployment) -> None:
    system, acc = deployment.system, deployment.accounts
    clinician, admin = acc["clinician_a"].headers, acc["admin_a"].headers
    study, series = new_uid(), new_uid()
    first = ct_instance(study, series, 1, rows=16, columns=16, frames=3)
    sop = str(pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID)
    values = {"study": study, "series": series, "instance": sop, "frames": "1,3", "path": "7FE00010"}
    # Three instances in two series, so that each DELETE row (instance, series, study) finds something.
    posts = iter(
        [
            [first, ct_instance(study, series, 3, rows=16, columns=16)],
            [ct_instance(study, new_uid(), 2, rows=16, columns=16)],
        ]
    )
    rows = table("Resources (checked)")
    assert {r["method"] for r in rows} == {"POST", "GET", "DELETE"}
    for row in rows:
        url = system.dicomweb_url + row["resource"].format(**values)
        if row["method"] == "POST":
            body, content_type = multipart_util.encode(next(posts))
            r = httpx.post(
                url,
                content=body,
                headers={"Content-Type": content_type, "Accept": row["accept"], **clinician},
            )
        elif row["method"] == "GET":
            r = httpx.get(url, headers={"Accept": row["accept"], **clinician}, timeout=60)
        else:  # deletes come last in the table: instance, then series, then study
            r = httpx.delete(url, headers={"Accept": row["accept"], **admin})
        assert r.status_code == int(row["status"]), (row, r.text[:300])
    assert httpx.get(f"{system.dicomweb_url}/studies/{study}/metadata", headers=clinician).status_code == 404


def test_failure_reasons_are_the_ones_stow_uses() -> None:
    documented = {int(r["reason"], 16) for r in table("Failure reasons (checked)")}
    in_code = {v for k, v in vars(dicom_media).items() if k.startswith("FAILURE_") and isinstance(v, int)}
    assert documented == in_code


def test_matching_keys_are_exactly_the_searchable_ones(deployment: Deployment) -> None:
    rows = table("Matching keys (checked)")
    documented = {(r["level"], r["keyword"], r["tag"], r["matching"]) for r in rows}
    in_code = {
        (level.name.lower(), key.keyword, key.name, MATCHING[key.kind])
        for level in Level
        for key in keys_at(level)
    }
    assert documented == in_code
    # The running server accepts every key, by tag, at its level (an empty value: universal matching).
    headers = {"Accept": "application/dicom+json", **deployment.accounts["clinician_a"].headers}
    for row in rows:
        url = f"{deployment.system.dicomweb_url}/{LEVEL_PATH[Level[row['level'].upper()]]}"
        r = httpx.get(url, params={row["tag"]: "", "limit": "1"}, headers=headers)
        assert r.status_code == 200, (row, r.text[:300])


@pytest.mark.parametrize("row", table("Transfer syntaxes (checked)"), ids=lambda r: r["transfer syntax"])
def test_transfer_syntax_table_matches_the_decoders_and_frame_types(row: dict[str, str]) -> None:
    syntax = row["transfer syntax"]
    assert natural_media_type(syntax) == row["frames as stored"]
    if syntax != dicom_media.EXPLICIT_VR_LITTLE_ENDIAN:
        assert can_decode(syntax) is (row["converted"] in ("yes", "8-bit only")), row
