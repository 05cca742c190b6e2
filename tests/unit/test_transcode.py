"""Transcoding to Explicit VR Little Endian: pixels equal pydicom's own decoding, bounds, corrupt data."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import expand_ybr422, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacslib.negotiation import parse_accept
from services.storage import transcode
from services.storage.context import open_context
from services.storage.instances import NewInstance, index_instance
from services.storage.objects import write_object
from services.storage.ports import PutOutcome
from services.storage.settings import StorageSettings
from services.storage.transcode import (
    PixelModule,
    TranscodeError,
    codestream_dimensions,
    decode_frame,
    run_decoder,
    swap_bytes,
    to_explicit_vr_little_endian,
)
from services.storage.wado import multipart_instances, plan_retrieve
from tests import multipart_util

LIMIT = 256 << 20
EVRLE = "1.2.840.10008.1.2.1"

# Every bundled file in a transfer syntax other than Explicit VR Little Endian that can be converted.
CONVERTIBLE = [
    "693_J2KI.dcm",  # JPEG 2000
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless, YBR_RCT
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000.dcm",
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless
    "JPEGLSNearLossless_16.dcm",
    "MR_small_RLE.dcm",  # RLE
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_jpeg_no_color_transform.dcm",  # JPEG baseline, RGB
    "SC_jpeg_no_color_transform_2.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+n2.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm",
    "SC_rgb_jpeg_app14_dcmd.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "examples_jpeg2k.dcm",
    "examples_ybr_color.dcm",  # JPEG baseline YBR_FULL_422, 30 frames
    "rtdose_rle.dcm",
    "rtdose_rle_1frame.dcm",
    "ExplVR_BigEnd.dcm",  # big endian, 8-bit OB
    "MR_small_bigendian.dcm",
    "SC_rgb_small_odd_big_endian.dcm",  # big endian, 8-bit OW (swapped words)
    "liver_expb_1frame.dcm",  # big endian, 1-bit
    "rtdose_expb.dcm",  # big endian, 32-bit
    "image_dfl.dcm",  # deflated
    "MR_small_implicit.dcm",  # implicit VR
    "rtdose.dcm",
    "rtplan.dcm",  # implicit VR, no pixel data
    "UN_sequence.dcm",  # JPEG lossless transfer syntax, no pixel data
]


def _bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return Path(path).read_bytes()


def _compressed(name: str) -> bool:
    return bool(
        pydicom.dcmread(
            io.BytesIO(_bytes(name)), stop_before_pixels=True
        ).file_meta.TransferSyntaxUID.is_compressed
    )


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_converted_instance_keeps_everything_and_decodes_to_pydicoms_pixels(name: str) -> None:
    source = _bytes(name)
    out = to_explicit_vr_little_endian(source, LIMIT)
    before = pydicom.dcmread(io.BytesIO(source))
    after = pydicom.dcmread(io.BytesIO(out))
    assert after.file_meta.TransferSyntaxUID == EVRLE
    # The file meta group length is right: pydicom finds the data set right after it.
    raw = io.BytesIO(out)
    raw.seek(132 + 8)
    assert int.from_bytes(raw.read(4), "little") == after.file_meta.FileMetaInformationGroupLength
    for key in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "PatientName", "PatientID"):
        assert after.get(key) == before.get(key), key
    changed = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames"}
    for elem in before:
        if elem.keyword in changed or elem.tag.element == 0 or elem.tag in (0x7FE00001, 0x7FE00002):
            continue
        assert after[elem.tag].value == elem.value, elem.tag
    if "PixelData" in before:
        assert not after["PixelData"].is_undefined_length
        assert np.array_equal(after.pixel_array, before.pixel_array)
        assert after.PhotometricInterpretation in transcode.NATIVE_PHOTOMETRIC
        if _compressed(name) and before.SamplesPerPixel == 3:
            # Decoded colour is interleaved RGB (YBR decoded to RGB), and the attributes say so.
            assert after.get("PlanarConfiguration", 0) == 0
            if before.PhotometricInterpretation.startswith("YBR"):
                assert after.PhotometricInterpretation == "RGB"


def test_explicit_vr_little_endian_is_returned_untouched() -> None:
    source = _bytes("CT_small.dcm")
    assert to_explicit_vr_little_endian(source, LIMIT) is source


def test_big_endian_binary_values_are_swapped_too() -> None:
    ds = pydicom.dcmread(io.BytesIO(_bytes("MR_small_bigendian.dcm")))
    words = np.arange(64, dtype=">u2")
    ds.add_new(0x60003000, "OW", words.tobytes())  # Overlay Data, big endian words
    ds.add_new(0x00720068, "OF", np.array([1.5, -2.25], dtype=">f4").tobytes())  # a float vector
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    after = pydicom.dcmread(io.BytesIO(to_explicit_vr_little_endian(buf.getvalue(), LIMIT)))
    assert after[0x60003000].value == words.astype("<u2").tobytes()
    assert np.frombuffer(after[0x00720068].value, "<f4").tolist() == [1.5, -2.25]
    assert np.array_equal(after.pixel_array, pydicom.dcmread(io.BytesIO(_bytes("MR_small.dcm"))).pixel_array)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("JPEG-lossy.dcm", "could not be decoded"),  # corrupt codestream: every decoder fails
        # 12-bit JPEG Extended: only the GPL-3.0 libjpeg decodes it, and it is not used (licence)
        ("JPGExtended.dcm", "could not be decoded"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "declares a larger image"),
    ],
)
def test_undecodable_instances_are_refused_with_a_reason_and_no_phi(
    name: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    patient = str(pydicom.dcmread(io.BytesIO(_bytes(name))).PatientName)
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(_bytes(name), LIMIT)
    assert why in raised.value.reason
    assert patient not in raised.value.reason
    assert patient not in caplog.text


def test_corrupt_frame_is_refused_without_leaking_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ds = pydicom.dcmread(io.BytesIO(_bytes("MR_small_jp2klossless.dcm")))
    ds.PatientName = "LEAKY^PATIENT"
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    broken = frame[:60] + bytes(len(frame) - 60)  # header intact, the coded data zeroed
    ds.PixelData = pydicom.encaps.encapsulate([broken])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(buf.getvalue(), LIMIT)
    assert "could not be decoded" in raised.value.reason
    with pytest.raises(TranscodeError):
        decode_frame(broken, str(ds.file_meta.TransferSyntaxUID), PixelModule.from_dataset(ds), LIMIT)
    assert "LEAKY" not in caplog.text
    assert "LEAKY" not in raised.value.reason


def test_decoded_size_limit_is_checked_before_decoding() -> None:
    source = _bytes("examples_ybr_color.dcm")  # 30 frames of 240x320x3: 6.9 MB decoded
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(source, 4 << 20)
    assert "6912000 bytes, above the 4194304-byte" in raised.value.reason
    with pytest.raises(TranscodeError) as stored:
        to_explicit_vr_little_endian(source, 100_000)
    assert "as stored" in stored.value.reason


def test_a_small_codestream_claiming_a_huge_image_is_refused_before_decoding() -> None:
    ds = pydicom.dcmread(io.BytesIO(_bytes("JPEG2000.dcm")))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    siz = frame.index(b"\xff\x51")
    bomb = bytearray(frame)
    bomb[siz + 6 : siz + 14] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz: 60000 x 60000
    assert codestream_dimensions(bytes(bomb), str(ds.file_meta.TransferSyntaxUID))[:2] == (60000, 60000)  # type: ignore[index]
    ds.PixelData = pydicom.encaps.encapsulate([bytes(bomb)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    started = time.monotonic()
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(buf.getvalue(), LIMIT)
    assert "declares a larger image" in raised.value.reason
    with pytest.raises(TranscodeError):
        decode_frame(bytes(bomb), str(ds.file_meta.TransferSyntaxUID), PixelModule.from_dataset(ds), LIMIT)
    assert time.monotonic() - started < 5


def test_jpeg_header_is_read_for_its_dimensions() -> None:
    ds = pydicom.dcmread(io.BytesIO(_bytes("SC_rgb_jpeg_dcmtk.dcm")))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    assert codestream_dimensions(frame, "1.2.840.10008.1.2.4.50") == (ds.Rows, ds.Columns, 3)
    with pytest.raises(TranscodeError):
        codestream_dimensions(b"not a jpeg", "1.2.840.10008.1.2.4.50")
    assert codestream_dimensions(b"anything", "1.2.840.10008.1.2.5") is None


def test_deflate_bomb_is_refused_while_inflating() -> None:
    ds = pydicom.dcmread(io.BytesIO(_bytes("image_dfl.dcm")))
    ds.Rows = ds.Columns = 8192  # 64 MiB of zeros deflate to about 64 KiB
    ds.PixelData = bytes(8192 * 8192)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert len(buf.getvalue()) < 1 << 20
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(buf.getvalue(), 16 << 20)
    assert "inflates to more than" in raised.value.reason


def test_truncated_deflated_data_set_is_refused() -> None:
    source = _bytes("image_dfl.dcm")
    with pytest.raises(TranscodeError) as raised:
        to_explicit_vr_little_endian(source[: len(source) // 2], LIMIT)
    assert "truncated" in raised.value.reason


def test_not_dicom_is_refused() -> None:
    with pytest.raises(TranscodeError):
        to_explicit_vr_little_endian(b"\x00" * 200, LIMIT)


def _frames_of(name: str) -> tuple[pydicom.Dataset, list[bytes]]:
    ds = pydicom.dcmread(io.BytesIO(_bytes(name)))
    return ds, list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))


FRAME_FILES = [
    n
    for n in CONVERTIBLE
    if _compressed(n)
    and n != "UN_sequence.dcm"
    and pydicom.dcmread(io.BytesIO(_bytes(n)), stop_before_pixels=True).PhotometricInterpretation
    != "YBR_FULL_422"
]


@pytest.mark.parametrize("name", FRAME_FILES)
def test_each_frame_decodes_alone_to_pydicoms_pixels_in_the_stored_colour_space(name: str) -> None:
    ds, frames = _frames_of(name)
    pixels = PixelModule.from_dataset(ds)
    for index, frame in enumerate(frames):
        got = decode_frame(frame, str(ds.file_meta.TransferSyntaxUID), pixels, LIMIT)
        expected = pixel_array(io.BytesIO(_bytes(name)), index=index, as_rgb=False)
        assert got == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), index


def test_planar_configuration_of_the_metadata_is_honoured() -> None:
    ds, (frame,) = _frames_of("SC_rgb_rle.dcm")
    planar = dataclasses.replace(PixelModule.from_dataset(ds), planar_configuration=1)
    got = decode_frame(frame, "1.2.840.10008.1.2.5", planar, LIMIT)
    expected = pixel_array(io.BytesIO(_bytes("SC_rgb_rle.dcm")), as_rgb=False).transpose(2, 0, 1)
    assert got == expected.tobytes()


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+np.dcm", "examples_ybr_color.dcm"])
def test_ybr_full_422_frames_come_back_in_the_422_layout(name: str) -> None:
    ds, frames = _frames_of(name)
    pixels = PixelModule.from_dataset(ds)
    got = decode_frame(frames[0], "1.2.840.10008.1.2.4.50", pixels, LIMIT)
    assert len(got) == ds.Rows * ds.Columns * 2  # Y Y Cb Cr per pair of pixels
    full = np.frombuffer(expand_ybr422(got, 8), np.uint8).reshape(ds.Rows, ds.Columns, 3)
    reference = pixel_array(io.BytesIO(_bytes(name)), index=0, as_rgb=False)
    assert np.array_equal(full[..., 0], reference[..., 0])  # luminance exact
    # Chroma is averaged over each pair (the decoder interpolated it when upsampling).
    assert np.abs(full.astype(int) - reference.astype(int)).max() <= 8


def test_frame_limits() -> None:
    ds, (frame,) = _frames_of("JPEG2000.dcm")
    pixels = PixelModule.from_dataset(ds)
    with pytest.raises(TranscodeError) as raised:
        decode_frame(frame, "1.2.840.10008.1.2.4.91", pixels, 1000)
    assert "above the 1000-byte limit" in raised.value.reason
    with pytest.raises(TranscodeError) as none:
        decode_frame(frame, "1.2.840.10008.1.2.4.100", pixels, LIMIT)  # MPEG2: no decoder here
    assert "no decoder" in none.value.reason


def test_pixel_module_from_dicom_json() -> None:
    ds = pydicom.dcmread(io.BytesIO(_bytes("SC_rgb_rle_2frame.dcm")), stop_before_pixels=True)
    module = PixelModule.from_json(ds.to_json_dict())
    assert module == PixelModule.from_dataset(ds)
    assert module.total_bytes == 2 * 100 * 100 * 3
    with pytest.raises(TranscodeError):
        PixelModule.from_json({})
    bad = ds.to_json_dict()
    bad["00280004"]["Value"] = ["NOT A REAL ONE"]
    with pytest.raises(TranscodeError):
        PixelModule.from_json(bad)


def test_swap_bytes_keeps_a_trailing_partial_word() -> None:
    assert swap_bytes(b"\x01\x02\x03\x04\x05", 2) == b"\x02\x01\x04\x03\x05"
    assert swap_bytes(b"\x01\x02\x03\x04", 4) == b"\x04\x03\x02\x01"


async def test_decodes_run_at_most_one_per_cpu_even_when_callers_go_away() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def work(seconds: float) -> float:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(seconds)
        with lock:
            running -= 1
        return seconds

    slots = transcode._SLOTS.size
    abandoned = [asyncio.create_task(run_decoder(work, 0.2)) for _ in range(slots)]
    await asyncio.sleep(0.05)
    for task in abandoned:
        task.cancel()  # their threads still run: their slots stay taken until they end
    results = await asyncio.gather(*(run_decoder(work, 0.05) for _ in range(3 * slots)))
    assert results == [0.05] * (3 * slots)
    assert peak == slots


async def test_decoder_errors_reach_the_caller() -> None:
    def fail(_: Any) -> None:
        raise TranscodeError("a reason")

    with pytest.raises(TranscodeError, match="a reason"):
        await run_decoder(fail, None)


async def test_conversions_past_the_memory_budget_are_redone_while_streaming(tmp_path: Path) -> None:
    ctx = await open_context(StorageSettings(state_dir=tmp_path, max_transcode_bytes=1 << 20))
    try:
        blobs = []
        for _ in range(3):  # each about 0.5 MiB once decoded: the 1 MiB budget keeps one
            ds = pydicom.dcmread(io.BytesIO(_bytes("JPEG2000.dcm")))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            blobs.append(buf.getvalue())
            written = await write_object(ctx, _one_chunk(buf.getvalue()))
            new = NewInstance(
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                object_id=written.object_id,
                size=written.size,
                sha256=written.sha256,
                metadata={},
                frames=None,
            )
            assert await index_instance(ctx, new) is PutOutcome.STORED
        records = await ctx.metadata.list_instances(str(ds.StudyInstanceUID), None)
        plan = await plan_retrieve(
            ctx,
            records,
            parse_accept(f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}'),
        )
        assert plan.skipped == 0
        assert [part.transcode for part in plan.parts] == [True] * 3
        assert [part.converted is not None for part in plan.parts] == [True, False, False]
        body = b"".join([chunk async for chunk in multipart_instances(ctx, plan.parts, "b0undary")])
        parts = multipart_util.decode(body, 'multipart/related; type="application/dicom"; boundary=b0undary')
        expected = pydicom.dcmread(io.BytesIO(blobs[0])).pixel_array
        assert len(parts) == 3
        for _, payload in parts:
            got = pydicom.dcmread(io.BytesIO(payload))
            assert got.file_meta.TransferSyntaxUID == EVRLE
            assert np.array_equal(got.pixel_array, expected)
    finally:
        await ctx.close()


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
