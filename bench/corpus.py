"""The benchmark corpus: deterministic synthetic CT studies, one large multi-frame instance and pydicom's
bundled test files across transfer syntaxes.

Everything is derived from one seed: UIDs (pydicom ``generate_uid`` with entropy sources), patient and
study attributes, and pixel data (a CT-like phantom with seeded noise), so two runs with the same
parameters produce byte-identical instances (the corpus fingerprint in the results shows it).
All names and IDs are synthetic.
"""

from __future__ import annotations

import datetime
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
ROWS = COLUMNS = 512
FIRST_STUDY_DATE = datetime.date(2024, 1, 1)
STUDY_DATE_STEP_DAYS = 7
DATE_SPAN_DAYS = 3653  # ten years; coprime with 7, so wrapped dates cover every day

# Synthetic patients: family names chosen so that a prefix wildcard ("SMI*") has a known answer.
FAMILY_NAMES = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS")
GIVEN_NAMES = ("ALEX", "SAM", "ROBIN", "KIM", "JORDAN", "CASEY", "TAYLOR", "MORGAN", "JAMIE")

# One bundled pydicom file per transfer syntax (all inside the wheel, so they work offline).
TEST_FILES = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian (retired)
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline
    "JPEG-lossy.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS Near-Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE Lossless
)


@dataclass(frozen=True, slots=True)
class Instance:
    """One Part-10 instance of the corpus with the attributes the benchmark checks answers against."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    frames: int
    kind: str  # "synthetic", "multiframe" or "testfile:<name>"

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class Corpus:
    """All instances of a run, grouped the way the phases use them."""

    studies: int
    series_per_study: int
    instances_per_series: int
    seed: int
    synthetic: list[Instance] = field(default_factory=list)
    multiframe: Instance | None = None
    testfiles: list[Instance] = field(default_factory=list)

    def all(self) -> list[Instance]:
        mf = [self.multiframe] if self.multiframe is not None else []
        return [*self.synthetic, *mf, *self.testfiles]

    def fingerprint(self) -> str:
        """SHA-256 over every instance's bytes, in corpus order (equal across runs with equal params)."""
        digest = hashlib.sha256()
        for inst in self.all():
            digest.update(hashlib.sha256(inst.data).digest())
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(inst.size for inst in self.all())

    def study_uids(self) -> list[str]:
        """Synthetic study UIDs in corpus order."""
        seen: dict[str, None] = {}
        for inst in self.synthetic:
            seen.setdefault(inst.study_uid, None)
        return list(seen)


def det_uid(seed: int, *parts: object) -> str:
    """A UID derived only from the seed and ``parts``."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"cloudpacs-bench:{seed}", *map(str, parts)]))


def patient_of(study_index: int, studies: int) -> tuple[str, str, str, str]:
    """(PatientID, PatientName, BirthDate, Sex) of the patient of a study: about two studies each."""
    patients = max(1, studies // 2)
    p = study_index % patients
    family = FAMILY_NAMES[p % len(FAMILY_NAMES)]
    given = GIVEN_NAMES[(p // len(FAMILY_NAMES)) % len(GIVEN_NAMES)]
    birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=(p * 3571) % 25000)
    return f"BENCH{p:06d}", f"{family}^{given}{p}", birth.strftime("%Y%m%d"), "MF"[p % 2]


def study_date(study_index: int) -> str:
    """One study a week from 2024-01-01, wrapping around after ten years (for the scale mode)."""
    days = (STUDY_DATE_STEP_DAYS * study_index) % DATE_SPAN_DAYS
    return (FIRST_STUDY_DATE + datetime.timedelta(days=days)).strftime("%Y%m%d")


def phantom(rng: np.random.Generator, position: float, frames: int = 1) -> bytes:
    """CT-like 12-bit pixels (stored value = HU + 1024): air, a soft-tissue body, a bone ring, noise."""
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    out = np.empty((frames, ROWS, COLUMNS), dtype="<u2")
    for f in range(frames):
        z = position + f
        a = 200 + 30 * np.sin(z / 17.0)
        b = 150 + 20 * np.cos(z / 23.0)
        r = ((x - 256) / a) ** 2 + ((y - 256) / b) ** 2
        img = np.where(r <= 1.0, 1024 + 40, 24).astype(np.float32)
        img = np.where((r > 0.8) & (r <= 0.9), 1024 + 700, img)
        img += rng.normal(0.0, 12.0, size=img.shape).astype(np.float32)
        out[f] = np.clip(img, 0, 4095).astype("<u2")
    return out.tobytes()


def _common(ds: Dataset, *, sop_class: str, sop: str, ts: str = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = UID(ts)
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop


def _save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synthetic_dataset(
    seed: int, study: int, series: int, number: int, studies: int, *, pixels: bool = True
) -> Dataset:
    """One 512x512 16-bit CT slice with the attributes a modality would send (header only: no pixels)."""
    study_uid = det_uid(seed, "study", study)
    series_uid = det_uid(seed, "series", study, series)
    sop = det_uid(seed, "sop", study, series, number)
    patient_id, patient_name, birth, sex = patient_of(study, studies)
    date = study_date(study)
    ds = Dataset()
    _common(ds, sop_class=CTImageStorage, sop=sop)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = det_uid(seed, "for", study)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = f"{8 + study % 10:02d}{(study * 7) % 60:02d}00"
    ds.SeriesTime = ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"ACC{seed % 1000:03d}{study:07d}"
    ds.StudyID = str(study + 1)
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS W CONTRAST" if study % 2 else "CT HEAD WO CONTRAST"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.InstitutionName = "BENCHMARK HOSPITAL"
    ds.Manufacturer = "BENCH MEDICAL"
    ds.ManufacturerModelName = "SYNTH-CT 64"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST" if study % 2 else "HEAD"
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = f"AXIAL {5 if series % 2 else 1}.0 MM"
    ds.InstanceNumber = number + 1
    ds.PatientPosition = "HFS"
    ds.KVP = 120
    ds.SliceThickness = 5.0 if series % 2 else 1.0
    ds.ImagePositionPatient = [-250.0, -250.0, -float(number) * float(ds.SliceThickness)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = -float(number) * float(ds.SliceThickness)
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    if pixels:
        ds.PixelData = phantom(np.random.default_rng([seed, study, series, number]), float(number))
    return ds


def synthetic_instance(seed: int, study: int, series: int, number: int, studies: int) -> Instance:
    """One synthetic CT slice as a Part-10 file."""
    ds = synthetic_dataset(seed, study, series, number, studies)
    return Instance(
        _save(ds),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        ExplicitVRLittleEndian,
        str(ds.PatientID),
        str(ds.PatientName),
        str(ds.StudyDate),
        "CT",
        1,
        "synthetic",
    )


def multiframe_instance(seed: int, frames: int) -> Instance:
    """One multi-frame 16-bit instance (a secondary-capture volume) in a study of its own."""
    rng = np.random.default_rng([seed, 999_999])
    study_uid = det_uid(seed, "mf-study")
    series_uid = det_uid(seed, "mf-series")
    sop = det_uid(seed, "mf-sop")
    date = "20250615"
    ds = Dataset()
    _common(ds, sop_class=MULTIFRAME_SOP_CLASS, sop=sop)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "VOLUME^MULTIFRAME"
    ds.PatientID = "BENCH-MF"
    ds.PatientBirthDate = "19650505"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACCMF"
    ds.StudyID = "MF"
    ds.StudyDescription = "CT VOLUME RECONSTRUCTION"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100.0
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 1064
    ds.WindowWidth = 400
    ds.PixelData = phantom(rng, 0.0, frames)
    return Instance(
        _save(ds),
        study_uid,
        series_uid,
        sop,
        ExplicitVRLittleEndian,
        "BENCH-MF",
        "VOLUME^MULTIFRAME",
        date,
        "OT",
        frames,
        "multiframe",
    )


def test_file_instance(seed: int, name: str) -> Instance:
    """A bundled pydicom test file, re-identified with fresh UIDs (several share a SOP Instance UID)."""
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise FileNotFoundError(f"pydicom's bundled test file {name} is not available")
    ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    ds.StudyInstanceUID = det_uid(seed, "tf-study", name)
    ds.SeriesInstanceUID = det_uid(seed, "tf-series", name)
    sop = det_uid(seed, "tf-sop", name)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    data = _save(ds)
    check = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    if str(check.file_meta.TransferSyntaxUID) != ts:
        raise ValueError(f"re-writing {name} changed its transfer syntax")
    return Instance(
        data,
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        sop,
        ts,
        str(ds.get("PatientID", "")),
        str(ds.get("PatientName", "")),
        str(ds.get("StudyDate", "")),
        str(ds.get("Modality", "")),
        int(ds.get("NumberOfFrames", 1) or 1),
        f"testfile:{name}",
    )


def build(
    studies: int,
    series_per_study: int,
    instances_per_series: int,
    *,
    seed: int = 1,
    multiframe_frames: int = 100,
    test_files: Iterable[str] = TEST_FILES,
) -> Corpus:
    """Generate the whole corpus in memory (about 0.5 MB per synthetic instance)."""
    corpus = Corpus(studies, series_per_study, instances_per_series, seed)
    for st in range(studies):
        for se in range(series_per_study):
            for n in range(instances_per_series):
                corpus.synthetic.append(synthetic_instance(seed, st, se, n, studies))
    if multiframe_frames > 0:
        corpus.multiframe = multiframe_instance(seed, multiframe_frames)
    corpus.testfiles = [test_file_instance(seed, name) for name in test_files]
    return corpus
