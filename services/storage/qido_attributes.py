"""Which DICOM attributes QIDO-RS knows: their level, the default result sets and the matching keys.

Levels follow the Study Root information model (PS3.4 C.6.2): Patient attributes count as Study
attributes. An attribute that is neither study- nor series-level is an instance-level attribute.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from services.storage.ports import Level


def tag_of(keyword: str) -> str:
    """The 8-hex-digit tag of a dictionary keyword (KeyError if there is none)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def _tags(keywords: str) -> frozenset[str]:
    return frozenset(tag_of(k) for k in keywords.split())


# Patient module, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study (PS3.3), plus
# Timezone Offset From UTC, which PS3.18 returns at every level.
STUDY_LEVEL_TAGS = _tags(
    """
    PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence TypeOfPatientID
    PatientBirthDate PatientBirthTime PatientSex QualityControlSubject OtherPatientIDsSequence
    OtherPatientNames PatientMotherBirthName EthnicGroup PatientComments PatientSpeciesDescription
    PatientSpeciesCodeSequence PatientBreedDescription PatientBreedCodeSequence BreedRegistrationSequence
    ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization PatientIdentityRemoved
    DeidentificationMethod DeidentificationMethodCodeSequence ReferencedPatientSequence
    ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName ClinicalTrialSiteID
    ClinicalTrialSiteName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID
    StudyInstanceUID StudyDate StudyTime ReferringPhysicianName ReferringPhysicianIdentificationSequence
    ConsultingPhysicianName StudyID AccessionNumber IssuerOfAccessionNumberSequence StudyDescription
    PhysiciansOfRecord NameOfPhysiciansReadingStudy RequestingService ProcedureCodeSequence
    ReasonForPerformedProcedureCodeSequence ReferencedStudySequence
    AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize PatientWeight
    PatientSizeCodeSequence MedicalAlerts Allergies SmokingStatus PregnancyStatus LastMenstrualDate
    Occupation AdditionalPatientHistory AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID
    ServiceEpisodeDescription PatientState ClinicalTrialTimePointID ClinicalTrialTimePointDescription
    TimezoneOffsetFromUTC
    """
)

# General Series, General Equipment, Frame of Reference (PS3.3).
SERIES_LEVEL_TAGS = _tags(
    """
    Modality SeriesInstanceUID SeriesNumber Laterality SeriesDate SeriesTime PerformingPhysicianName
    PerformingPhysicianIdentificationSequence ProtocolName SeriesDescription SeriesDescriptionCodeSequence
    OperatorsName OperatorIdentificationSequence ReferencedPerformedProcedureStepSequence
    RelatedSeriesSequence BodyPartExamined PatientPosition SmallestPixelValueInSeries
    LargestPixelValueInSeries RequestAttributesSequence PerformedProcedureStepID
    PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedProcedureStepEndDate
    PerformedProcedureStepEndTime PerformedProcedureStepDescription PerformedProtocolCodeSequence
    CommentsOnThePerformedProcedureStep AnatomicalOrientationType
    Manufacturer InstitutionName InstitutionAddress StationName InstitutionalDepartmentName
    ManufacturerModelName DeviceSerialNumber SoftwareVersions GantryID SpatialResolution
    DateOfLastCalibration TimeOfLastCalibration
    FrameOfReferenceUID PositionReferenceIndicator
    """
)

# Attributes the service computes instead of reading them from a stored document.
MODALITIES_IN_STUDY = tag_of("ModalitiesInStudy")
SOP_CLASSES_IN_STUDY = tag_of("SOPClassesInStudy")
STUDY_SERIES_COUNT = tag_of("NumberOfStudyRelatedSeries")
STUDY_INSTANCE_COUNT = tag_of("NumberOfStudyRelatedInstances")
SERIES_INSTANCE_COUNT = tag_of("NumberOfSeriesRelatedInstances")
INSTANCE_AVAILABILITY = tag_of("InstanceAvailability")
RETRIEVE_URL = tag_of("RetrieveURL")
STUDY_UID = tag_of("StudyInstanceUID")
SERIES_UID = tag_of("SeriesInstanceUID")
SOP_UID = tag_of("SOPInstanceUID")

STUDY_COMPUTED = frozenset(
    {MODALITIES_IN_STUDY, SOP_CLASSES_IN_STUDY, STUDY_SERIES_COUNT, STUDY_INSTANCE_COUNT}
)
SERIES_COMPUTED = frozenset({SERIES_INSTANCE_COUNT})
INSTANCE_COMPUTED = frozenset({INSTANCE_AVAILABILITY})
COMPUTED_TAGS = STUDY_COMPUTED | SERIES_COMPUTED | INSTANCE_COMPUTED | {RETRIEVE_URL}

# Default result attributes, PS3.18 Tables 10.6.3-3, -4 and -5. Specific Character Set is left out:
# DICOM JSON is always UTF-8 (PS3.18 F.2), so the stored value would describe another encoding.
STUDY_DEFAULTS = _tags(
    """
    StudyDate StudyTime AccessionNumber InstanceAvailability ModalitiesInStudy ReferringPhysicianName
    TimezoneOffsetFromUTC RetrieveURL PatientName PatientID PatientBirthDate PatientSex StudyInstanceUID
    StudyID NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances
    """
)
SERIES_DEFAULTS = _tags(
    """
    Modality TimezoneOffsetFromUTC SeriesDescription RetrieveURL SeriesInstanceUID SeriesNumber
    NumberOfSeriesRelatedInstances PerformedProcedureStepStartDate PerformedProcedureStepStartTime
    RequestAttributesSequence StudyInstanceUID
    """
)
INSTANCE_DEFAULTS = _tags(
    """
    SOPClassUID SOPInstanceUID InstanceAvailability TimezoneOffsetFromUTC RetrieveURL InstanceNumber
    Rows Columns BitsAllocated NumberOfFrames StudyInstanceUID SeriesInstanceUID
    """
)


def level_of(tag: str) -> Level:
    """The information-model level an attribute belongs to."""
    if tag in STUDY_LEVEL_TAGS or tag in STUDY_COMPUTED:
        return Level.STUDY
    if tag in SERIES_LEVEL_TAGS or tag in SERIES_COMPUTED:
        return Level.SERIES
    return Level.INSTANCE


class MatchKind(enum.Enum):
    """How values of a matching key are compared and indexed."""

    UID = "uid"  # exact, lists allowed, no wildcards
    TEXT = "text"  # exact (case-sensitive) or wildcard
    NAME = "name"  # person name: case- and accent-insensitive, fuzzy word-prefix matching
    CODE = "code"  # code string: like TEXT
    NUMBER = "number"  # integer string: exact numeric value
    DATE = "date"  # single date or range
    TIME = "time"  # single time or range
    DATETIME = "datetime"  # single date-time or range


_KIND_BY_VR = {
    "UI": MatchKind.UID,
    "PN": MatchKind.NAME,
    "CS": MatchKind.CODE,
    "IS": MatchKind.NUMBER,
    "DA": MatchKind.DATE,
    "TM": MatchKind.TIME,
    "DT": MatchKind.DATETIME,
}


@dataclass(frozen=True, slots=True)
class MatchingKey:
    """An attribute QIDO-RS can match on. ``path`` is the tag path (a sequence, then its item attribute)."""

    keyword: str
    path: tuple[str, ...]
    level: Level
    kind: MatchKind
    computed: bool = False

    @property
    def tag(self) -> str:
        """The top-level tag (the sequence for a nested key)."""
        return self.path[0]

    @property
    def name(self) -> str:
        """The path as the index sees it, e.g. ``00400275.00400009``."""
        return ".".join(self.path)


def _key(keywords: str, level: Level, *, computed: bool = False) -> MatchingKey:
    names = keywords.split(".")
    path = tuple(tag_of(k) for k in names)
    vr = dictionary_VR(int(path[-1], 16))
    return MatchingKey(keywords, path, level, _KIND_BY_VR.get(vr, MatchKind.TEXT), computed)


# PS3.18 Table 10.6.1-5 (required) followed by the extra keys this server supports (docs/qido.md).
MATCHING_KEYS: tuple[MatchingKey, ...] = (
    _key("StudyInstanceUID", Level.STUDY),
    _key("StudyDate", Level.STUDY),
    _key("StudyTime", Level.STUDY),
    _key("AccessionNumber", Level.STUDY),
    _key("ModalitiesInStudy", Level.STUDY, computed=True),
    _key("ReferringPhysicianName", Level.STUDY),
    _key("PatientName", Level.STUDY),
    _key("PatientID", Level.STUDY),
    _key("StudyID", Level.STUDY),
    _key("SeriesInstanceUID", Level.SERIES),
    _key("Modality", Level.SERIES),
    _key("SeriesNumber", Level.SERIES),
    _key("PerformedProcedureStepStartDate", Level.SERIES),
    _key("PerformedProcedureStepStartTime", Level.SERIES),
    _key("RequestAttributesSequence.ScheduledProcedureStepID", Level.SERIES),
    _key("RequestAttributesSequence.RequestedProcedureID", Level.SERIES),
    _key("SOPClassUID", Level.INSTANCE),
    _key("SOPInstanceUID", Level.INSTANCE),
    _key("InstanceNumber", Level.INSTANCE),
    # extras
    _key("PatientBirthDate", Level.STUDY),
    _key("PatientSex", Level.STUDY),
    _key("IssuerOfPatientID", Level.STUDY),
    _key("StudyDescription", Level.STUDY),
    _key("SOPClassesInStudy", Level.STUDY, computed=True),
    _key("SeriesDescription", Level.SERIES),
    _key("SeriesDate", Level.SERIES),
    _key("SeriesTime", Level.SERIES),
    _key("BodyPartExamined", Level.SERIES),
    _key("Laterality", Level.SERIES),
    _key("InstitutionName", Level.SERIES),
    _key("StationName", Level.SERIES),
    _key("PerformingPhysicianName", Level.SERIES),
    _key("ContentDate", Level.INSTANCE),
    _key("ContentTime", Level.INSTANCE),
    _key("AcquisitionDate", Level.INSTANCE),
    _key("AcquisitionTime", Level.INSTANCE),
    _key("AcquisitionDateTime", Level.INSTANCE),
)

KEYS_BY_NAME: dict[str, MatchingKey] = {k.name: k for k in MATCHING_KEYS}


def keys_at(level: Level) -> tuple[MatchingKey, ...]:
    """The matching keys whose attribute lives at ``level``."""
    return tuple(k for k in MATCHING_KEYS if k.level is level)


def keyword_of(tag: str) -> str:
    """The dictionary keyword of a tag, or the tag itself when it has none."""
    return keyword_for_tag(int(tag, 16)) or tag
