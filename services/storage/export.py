"""Study export: every instance of a study, as stored, streamed as one ZIP archive.

The archive holds one DICOM Part 10 file per instance under a DICOM File-set path
(``DICOM/S0001/I0001``: series, then instance, in index order), without a DICOMDIR: building one
needs every instance's header before the first byte is sent, and a recipient makes it in seconds
(``dcmmkdir``, pydicom's ``FileSet``). No patient data is in any name.

The ZIP is written by the standard library's ``zipfile`` into a small in-memory spool that is
drained after every write: with no ``tell``/``seek`` it writes data descriptors after each file
(sizes and CRC-32 once known) and ZIP64 records where sizes need them. Files are stored, not
deflated: the bytes go out exactly as stored (most pixel data does not compress anyway), and a
chunk of plaintext is all the memory an export holds, never the study, never a file on disk.
"""

from __future__ import annotations

import logging
import stat
import time
import uuid
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from pacslib import envelope
from pacslib.errors import IntegrityFailureError
from pacslib.negotiation import MediaRange
from services.storage.context import StorageContext
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord
from services.storage.wado import STREAM_CHUNK

APPLICATION_ZIP = "application/zip"
FILE_SET_ROOT = "DICOM"
# Extracted files are readable by their owner only (they hold patient data).
FILE_MODE = stat.S_IFREG | 0o600

log = logging.getLogger("pacs.storage.export")


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One file of the archive: its File-set path and the instance it holds."""

    path: str
    record: InstanceRecord


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export sends, known before its first byte (the access event records it)."""

    export_id: str  # opaque: names the archive and ties the access event to the logs
    entries: list[ExportEntry]
    series: int
    payload_bytes: int  # the instances' bytes as stored (the archive adds headers)

    @property
    def filename(self) -> str:
        return f"{self.export_id}.zip"


def accepts_zip(accept: list[MediaRange]) -> bool:
    """True when the Accept header admits application/zip (``*/*`` and ``application/*`` do)."""
    return any(media.covers(APPLICATION_ZIP) for media in accept)


def file_id(series_index: int, instance_index: int) -> str:
    """The File-set path of an instance: components of at most 8 upper-case letters and digits (PS3.10)."""
    return f"{FILE_SET_ROOT}/S{series_index:04d}/I{instance_index:04d}"


def plan_export(records: list[InstanceRecord]) -> ExportPlan:
    """Name every instance: series numbered in index order, instances within their series."""
    series_index: dict[str, int] = {}
    counts: dict[str, int] = {}
    entries: list[ExportEntry] = []
    for record in records:
        number = series_index.setdefault(record.series_uid, len(series_index) + 1)
        counts[record.series_uid] = counts.get(record.series_uid, 0) + 1
        entries.append(ExportEntry(file_id(number, counts[record.series_uid]), record))
    return ExportPlan(
        export_id=uuid.uuid4().hex,
        entries=entries,
        series=len(series_index),
        payload_bytes=sum(r.size for r in records),
    )


class _Spool:
    """Where the ZIP writer writes: bytes kept in memory only until the stream takes them."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._pieces.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: ``drain`` hands the bytes on."""

    def close(self) -> None:
        self._pieces.clear()

    def drain(self) -> bytes:
        data = b"".join(self._pieces)
        self._pieces.clear()
        return data


async def zip_stream(ctx: StorageContext, plan: ExportPlan) -> AsyncGenerator[bytes, None]:
    """The archive of ``plan``, decrypting each instance segment by segment as it is sent.

    A stored object that fails its integrity check ends the stream without the archive's central
    directory, so the recipient sees a broken archive, never a complete-looking one that lacks a file.
    """
    spool = _Spool()
    archive = zipfile.ZipFile(spool, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    stamp = time.gmtime()[:6]
    sent = 0
    try:
        for entry in plan.entries:
            info = zipfile.ZipInfo(entry.path, date_time=stamp)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = FILE_MODE << 16
            info.file_size = entry.record.size  # decides ZIP64 for this entry up front
            with archive.open(info, mode="w") as member:
                async for chunk in _stored_bytes(ctx, entry.record):
                    member.write(chunk)
                    yield spool.drain()
            sent += 1
        archive.close()
        yield spool.drain()
    except BaseException as exc:
        log.warning(
            "export %s ended after %d of %d instances (%s)",
            plan.export_id,
            sent,
            len(plan.entries),
            type(exc).__name__,
        )
        raise
    finally:
        spool.close()


async def _stored_bytes(ctx: StorageContext, record: InstanceRecord) -> AsyncIterator[bytes]:
    reader = await open_reader(ctx, record.object_id)
    try:
        async for chunk in reader.stream(0, None, STREAM_CHUNK):
            yield chunk
    except envelope.IntegrityError as exc:
        log.error("integrity failure while reading object %s", record.object_id)
        raise IntegrityFailureError("a stored object failed its integrity check") from exc
