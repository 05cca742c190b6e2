"""Rendered and thumbnail resources through the whole system (gateway -> render -> storage), both modes.

Images are decoded with Pillow and compared with ``tests.render.reference`` (pydicom + numpy): PNG
exactly, JPEG within a small tolerance.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from embedded.launcher import EmbeddedSystem
from pacslib.events import TOPIC_AUDIT
from scripts.identities import Account
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment
from tests.render.reference import bundled, part10, reference_display, windowed, with_new_uids


def _store(system: EmbeddedSystem, *datasets: pydicom.Dataset) -> None:
    for ds in datasets:
        r = api.post(
            f"{system.dicomweb_url}/studies",
            content=part10(ds),
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        assert r.status_code == 200, r.text


def _instance_url(system: EmbeddedSystem, ds: pydicom.Dataset) -> str:
    return (
        f"{system.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def _client(system: EmbeddedSystem, account: Account) -> DICOMwebClient:
    return DICOMwebClient(url=system.dicomweb_url, headers=account.headers)


def _uids(ds: pydicom.Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def ct(system: EmbeddedSystem) -> pydicom.Dataset:
    ds = with_new_uids(bundled("CT_small.dcm"))
    _store(system, ds)
    return ds


@pytest.fixture(scope="module")
def ybr_multiframe(system: EmbeddedSystem) -> pydicom.Dataset:
    ds = with_new_uids(bundled("examples_ybr_color.dcm"))  # 30 JPEG baseline YBR_FULL_422 frames
    _store(system, ds)
    return ds


def test_instance_rendered_as_png_matches_the_reference(
    system: EmbeddedSystem, clinician: Account, ct: pydicom.Dataset
) -> None:
    png = _client(system, clinician).retrieve_instance_rendered(*_uids(ct), media_types=("image/png",))
    assert png.startswith(b"\x89PNG")
    assert np.array_equal(_pixels(png), reference_display(ct))


def test_instance_rendered_as_jpeg_is_close_to_the_reference(
    system: EmbeddedSystem, clinician: Account, ct: pydicom.Dataset
) -> None:
    jpeg = _client(system, clinician).retrieve_instance_rendered(
        *_uids(ct), media_types=("image/jpeg",), params={"quality": 95}
    )
    assert jpeg.startswith(b"\xff\xd8")
    difference = np.abs(_pixels(jpeg).astype(int) - reference_display(ct).astype(int))
    assert difference.mean() < 1.5
    assert difference.max() <= 16


def test_default_accept_is_jpeg_and_responses_are_not_stored(
    system: EmbeddedSystem, ct: pydicom.Dataset
) -> None:
    r = api.get(f"{_instance_url(system, ct)}/rendered")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["cache-control"] == "no-store"
    gif = api.get(f"{_instance_url(system, ct)}/rendered", params={"accept": "image/gif"})
    assert gif.headers["content-type"] == "image/gif"
    assert gif.content.startswith(b"GIF8")


def test_window_parameters_change_the_output(system: EmbeddedSystem, ct: pydicom.Dataset) -> None:
    url = f"{_instance_url(system, ct)}/rendered"
    plain = api.get(url, headers={"Accept": "image/png"})
    for center, width, function in ((40, 400, "linear"), (300, 1500, "linear-exact"), (0, 200, "sigmoid")):
        r = api.get(url, headers={"Accept": "image/png"}, params={"window": f"{center},{width},{function}"})
        assert r.status_code == 200, r.text
        expected = windowed(ct, center, width, function.upper().replace("-", "_"))
        assert np.abs(_pixels(r.content).astype(int) - expected.astype(int)).max() <= 1
        assert not np.array_equal(_pixels(r.content), _pixels(plain.content))


def test_frames_rendered_with_dicomweb_client(
    system: EmbeddedSystem, clinician: Account, ybr_multiframe: pydicom.Dataset
) -> None:
    client = _client(system, clinician)
    png = client.retrieve_instance_frames_rendered(*_uids(ybr_multiframe), [15], media_types=("image/png",))
    assert np.array_equal(_pixels(png), reference_display(ybr_multiframe, 14))
    r = api.get(
        f"{_instance_url(system, ybr_multiframe)}/frames/1,30/rendered", headers={"Accept": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = multipart_util.decode(r.content, r.headers["content-type"])
    assert [h["content-location"].rsplit("/", 2)[1] for h, _ in parts] == ["1", "30"]
    for (_, body), index in zip(parts, (0, 29), strict=True):
        assert np.array_equal(_pixels(body), reference_display(ybr_multiframe, index))


def test_viewport_scales_crops_and_flips(system: EmbeddedSystem, ct: pydicom.Dataset) -> None:
    url = f"{_instance_url(system, ct)}/rendered"
    full = reference_display(ct)
    assert Image.open(io.BytesIO(api.get(url, params={"viewport": "64,64"}).content)).size == (64, 64)
    assert Image.open(io.BytesIO(api.get(url, params={"viewport": "300,100"}).content)).size == (100, 100)
    crop = api.get(url, headers={"Accept": "image/png"}, params={"viewport": "32,16,10,20,32,16"})
    assert np.array_equal(_pixels(crop.content), full[20:36, 10:42])
    flipped = api.get(url, headers={"Accept": "image/png"}, params={"viewport": "128,128,128,0,-128,128"})
    assert np.array_equal(_pixels(flipped.content), full[:, ::-1])


def test_technique_annotation_is_burned_in(system: EmbeddedSystem, ct: pydicom.Dataset) -> None:
    url = f"{_instance_url(system, ct)}/rendered"
    plain = _pixels(api.get(url, headers={"Accept": "image/png"}).content)
    annotated = _pixels(
        api.get(url, headers={"Accept": "image/png"}, params={"annotation": "technique"}).content
    )
    changed = plain != annotated
    assert changed.any()
    assert not changed[: plain.shape[0] // 2].any()  # the caption sits in the bottom half only


def test_thumbnails(system: EmbeddedSystem, ct: pydicom.Dataset, ybr_multiframe: pydicom.Dataset) -> None:
    study, series, _ = _uids(ybr_multiframe)
    for url in (
        f"{system.dicomweb_url}/studies/{study}/thumbnail",
        f"{system.dicomweb_url}/studies/{study}/series/{series}/thumbnail",
        f"{_instance_url(system, ybr_multiframe)}/thumbnail",
        f"{_instance_url(system, ybr_multiframe)}/frames/3/thumbnail",
    ):
        r = api.get(url)
        assert r.status_code == 200, (url, r.text)
        assert r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (128, 96)  # 320x240 fit into 128x128
    r = api.get(
        f"{_instance_url(system, ct)}/thumbnail",
        params={"viewport": "32,32"},
        headers={"Accept": "image/png"},
    )
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)


def test_series_and_study_rendered_are_multipart_in_instance_order(
    system: EmbeddedSystem, clinician: Account
) -> None:
    study, series = new_uid(), new_uid()
    for number in (3, 1, 2):
        r = api.post(
            f"{system.dicomweb_url}/studies",
            content=ct_instance(study, series, number, rows=16, columns=24, seed=number),
            headers={"Content-Type": "application/dicom"},
        )
        assert r.status_code == 200, r.text
    body = _client(system, clinician).retrieve_series_rendered(study, series, media_types=("image/jpeg",))
    assert body  # dicomweb-client returns the multipart body as is
    r = api.get(
        f"{system.dicomweb_url}/studies/{study}/series/{series}/rendered", headers={"Accept": "image/png"}
    )
    assert r.status_code == 200, r.text
    parts = multipart_util.decode(r.content, r.headers["content-type"])
    assert len(parts) == 3
    numbers = []
    for headers, image in parts:
        sop = headers["content-location"].split("/instances/")[1].split("/")[0]
        meta = api.get(f"{system.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/metadata")
        numbers.append(meta.json()[0]["00200013"]["Value"][0])
        assert Image.open(io.BytesIO(image)).size == (24, 16)
    assert numbers == [1, 2, 3]
    whole = api.get(f"{system.dicomweb_url}/studies/{study}/rendered")
    assert len(multipart_util.decode(whole.content, whole.headers["content-type"])) == 3


def test_a_large_voi_lut_left_out_of_the_metadata_is_read_from_the_header(system: EmbeddedSystem) -> None:
    ds = with_new_uids(bundled("CT_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, -1024, 12]  # 8 KiB of LUT data: more than the metadata keeps inline
    item.add_new(0x00283006, "US", [int(4095 * (i / 4095) ** 0.4) for i in range(4096)])
    ds.VOILUTSequence = Sequence([item])
    _store(system, ds)
    r = api.get(f"{_instance_url(system, ds)}/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert np.abs(_pixels(r.content).astype(int) - reference_display(ds).astype(int)).max() <= 1
    del ds.VOILUTSequence  # without the LUT the image would look different
    assert np.abs(_pixels(r.content).astype(int) - reference_display(ds).astype(int)).max() > 16


def test_palette_and_monochrome1_render_like_the_reference(system: EmbeddedSystem) -> None:
    for name in ("examples_palette.dcm", "CR1/6154"):
        ds = with_new_uids(bundled(name))
        _store(system, ds)
        r = api.get(f"{_instance_url(system, ds)}/rendered", headers={"Accept": "image/png"})
        assert r.status_code == 200, (name, r.text)
        assert np.array_equal(_pixels(r.content), reference_display(ds)), name


def test_need_to_know_and_sign_in(deployment: Deployment, ct: pydicom.Dataset) -> None:
    url = f"{_instance_url(deployment.system, ct)}/rendered"
    thumbnail = f"{deployment.system.dicomweb_url}/studies/{ct.StudyInstanceUID}/thumbnail"
    for target in (url, thumbnail):
        other = api.get(target, headers=deployment.accounts["clinician_b"].headers)
        assert other.status_code == 404, other.text
        assert other.json() == {"error": "no such instance"} or "error" in other.json()
        anonymous = httpx.get(target)
        assert anonymous.status_code == 401
        assert "error" in anonymous.json()
        for role in ("auditor_a", "admin_a"):
            refused = api.get(target, headers=deployment.accounts[role].headers)
            assert refused.status_code == 403, (role, refused.text)
    missing = api.get(url.replace(str(ct.SOPInstanceUID), new_uid()))
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("suffix", "params", "headers", "status"),
    [
        ("/rendered", {"viewport": "5000,5000"}, {}, 400),
        ("/rendered", {"viewport": "0,10"}, {}, 400),
        ("/rendered", {"viewport": "10,10,500,500,10,10"}, {}, 400),
        ("/rendered", {"window": "abc,400"}, {}, 400),
        ("/rendered", {"window": "40,0,linear"}, {}, 400),
        ("/rendered", {"window": "40,400,cubic"}, {}, 400),
        ("/rendered", {"quality": "0"}, {}, 400),
        ("/rendered", {"annotation": "patient"}, {}, 400),
        ("/rendered", {}, {"Accept": "application/dicom"}, 406),
        ("/frames/2/rendered", {}, {}, 404),
        ("/frames/0/rendered", {}, {}, 400),
        ("/frames/1,x/rendered", {}, {}, 400),
        ("/frames/1,2/thumbnail", {}, {}, 400),
    ],
)
def test_bad_input_is_a_clear_4xx(
    system: EmbeddedSystem,
    ct: pydicom.Dataset,
    suffix: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
) -> None:
    r = api.get(f"{_instance_url(system, ct)}{suffix}", params=params, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_what_cannot_be_rendered_is_a_clear_4xx(system: EmbeddedSystem) -> None:
    corrupt = with_new_uids(bundled("JPEG-lossy.dcm"))  # a JPEG stream no decoder can read
    hsv = with_new_uids(bundled("examples_rgb_color.dcm"))
    hsv.PhotometricInterpretation = "HSV"
    report = with_new_uids(bundled("test-SR.dcm"))  # no pixel data at all
    _store(system, corrupt, hsv, report)
    for ds, status, words in (
        (corrupt, 415, "could not be decoded"),
        (hsv, 406, "HSV"),
        (report, 406, "no pixel data"),
    ):
        r = api.get(f"{_instance_url(system, ds)}/rendered")
        assert r.status_code == status, r.text
        assert words in r.json()["error"]


def test_render_never_receives_a_whole_instance(deployment: Deployment, clinician: Account) -> None:
    system = deployment.system
    ds = pydicom.dcmread(io.BytesIO(ct_instance(new_uid(), new_uid(), 1, rows=64, columns=48, frames=20)))
    _store(system, ds)
    instance_size = len(part10(ds))
    frame_size = 64 * 48 * 2
    url = f"{_instance_url(system, ds)}/frames/7/rendered"
    for params in ({}, {"window": "0,500"}, {}):
        assert api.get(url, params=params).status_code == 200
    sop = str(ds.SOPInstanceUID)
    found = deployment.find_events(
        TOPIC_AUDIT, lambda e: e.data.get("action") == "rendered" and e.data.get("sop_uid") == sop, count=3
    )
    events = [e.data for e in found]
    assert len(events) == 3
    assert all(e["frame"] == 7 and e["actor"]["sub"] == clinician.user_id for e in events)
    # The first request got exactly one frame; the next two were served from render's cache after
    # storage confirmed access (304: nothing sent).
    assert [e["bytes"] for e in events] == [frame_size, 0, 0]
    assert frame_size * 20 < instance_size
    assert [e.get("not_modified") for e in events] == [None, True, True]
