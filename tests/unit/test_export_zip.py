"""The export archive on the embedded adapters: File-set paths, bytes as stored, ZIP64, broken objects."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pacslib.errors import IntegrityFailureError
from services.storage.context import StorageContext, open_context
from services.storage.export import ExportPlan, file_id, plan_export, zip_stream
from services.storage.instances import NewInstance, index_instance
from services.storage.objects import object_key, write_object
from services.storage.settings import StorageSettings

STUDY = "1.2.3"


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[StorageContext]:
    context = await open_context(StorageSettings(state_dir=tmp_path, segment_size=4096))
    yield context
    await context.close()


async def _chunks(data: bytes, step: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def _store(ctx: StorageContext, series: str, sop: str, data: bytes) -> None:
    written = await write_object(ctx, _chunks(data))
    new = NewInstance(
        study_uid=STUDY,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        object_id=written.object_id,
        size=written.size,
        sha256=written.sha256,
        metadata={},
        frames=None,
    )
    await index_instance(ctx, new)


async def _study(ctx: StorageContext) -> dict[str, bytes]:
    """Two series (two instances, one instance) with distinct contents, by SOP Instance UID."""
    contents = {
        "1.2.3.1.1": bytes(range(256)) * 300,
        "1.2.3.1.2": b"second" * 5000,
        "1.2.3.2.1": b"\x00" * 12345,
    }
    for sop, data in contents.items():
        await _store(ctx, sop.rsplit(".", 1)[0], sop, data)
    return contents


async def _archive(ctx: StorageContext, plan: ExportPlan) -> tuple[bytes, int]:
    chunks = [chunk async for chunk in zip_stream(ctx, plan)]
    return b"".join(chunks), max(len(c) for c in chunks)


async def test_every_instance_is_in_the_archive_as_stored(ctx: StorageContext) -> None:
    contents = await _study(ctx)
    plan = plan_export(await ctx.metadata.list_instances(STUDY))
    assert plan.series == 2
    assert plan.payload_bytes == sum(map(len, contents.values()))
    assert [e.path for e in plan.entries] == ["DICOM/S0001/I0001", "DICOM/S0001/I0002", "DICOM/S0002/I0001"]
    assert len(plan.export_id) == 32
    assert plan.filename == f"{plan.export_id}.zip"
    data, largest = await _archive(ctx, plan)
    # Chunks stay about one read (1 MiB) plus headers, whatever the study's size.
    assert largest <= (1 << 20) + 4096
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        for entry in plan.entries:
            info = archive.getinfo(entry.path)
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.flag_bits & 0x08  # sizes and CRC after the data (a stream cannot seek back)
            assert (info.external_attr >> 16) & 0o777 == 0o600
            assert archive.read(entry.path) == contents[entry.record.sop_uid]


async def test_large_entries_and_archives_get_zip64_records(
    ctx: StorageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = await _study(ctx)
    # Lowered so that the ZIP64 code paths run on kilobytes instead of 4 GiB.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 20_000)
    plan = plan_export(await ctx.metadata.list_instances(STUDY))
    data, _ = await _archive(ctx, plan)
    monkeypatch.undo()
    assert b"PK\x06\x06" in data  # the ZIP64 end of central directory record
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in plan.entries:
            assert archive.read(entry.path) == contents[entry.record.sop_uid]


async def test_a_corrupt_object_breaks_the_archive(ctx: StorageContext) -> None:
    await _study(ctx)
    records = await ctx.metadata.list_instances(STUDY)
    path = ctx.settings.resolved_fs_root() / object_key(records[1].object_id)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 1
    path.write_bytes(bytes(blob))
    sent: list[bytes] = []

    async def consume() -> None:
        async for chunk in zip_stream(ctx, plan_export(records)):
            sent.append(chunk)

    with pytest.raises(IntegrityFailureError):
        await consume()
    # What went out has no central directory: no reader takes it for a complete archive.
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(b"".join(sent)))


def test_file_ids_are_file_set_components() -> None:
    for path in (file_id(1, 1), file_id(9999, 9999), file_id(12, 1234567)):
        parts = path.split("/")
        assert all(len(p) <= 8 and p.isalnum() and p.isupper() for p in parts), path
