"""DICOM PS3.15 Annex E: the Basic Application Level Confidentiality Profile applied to a pydicom data set.

``PROFILE`` is Table E.1-1 for the attributes that occur in images, structured reports and their
requests (about 270 rows; docs/deidentify.md says what is and is not covered), with the action codes of
the Basic Profile column. The actions apply wherever an attribute occurs, nested in sequences too.
A compound action (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``) is resolved without knowing each IOD's attribute
types by the choice that keeps every IOD conformant and still carries no identity: a dummy value
where ``D`` is allowed, else an empty value; a sequence is emptied where ``Z`` is allowed.

Beyond the table, a safety net judges every other attribute by its VR, so that an attribute the table
does not name (a newer one, or one nested somewhere unusual) cannot carry identity through:
private attributes, overlays, curves and group lengths are removed, person names emptied, free text
(LT, ST, UT) removed, dates emptied (or shifted/kept with the temporal options) and every UID that is not
a well-known (class, transfer syntax, coding scheme) UID replaced. Elements pydicom cannot decode are
removed. The options of Table E.1-1 that are cheap to honour are offered (``Options``); every UID that is
replaced is replaced consistently for the whole copy through one ``UidMap``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import Enum
from typing import Any, Final

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

# -- the profile -----------------------------------------------------------------------------------
# Action codes (PS3.15 Table E.1-1a): X remove, Z empty, D dummy value, U replaced UID, K keep,
# C clean; X/Z/U*: remove, empty, or keep with every UID inside replaced (reference sequences).
PROFILE_ACTIONS: Final[dict[str, str]] = {
    # Patient
    "PatientName": "Z",
    "PatientID": "Z",
    "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X",
    "TypeOfPatientID": "X",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientBirthDateInAlternativeCalendar": "X",
    "PatientDeathDateInAlternativeCalendar": "X",
    "PatientAlternativeCalendar": "X",
    "PatientSex": "Z",
    "PatientSexNeutered": "X/Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientPrimaryLanguageModifierCodeSequence": "X",
    "OtherPatientIDs": "X",
    "OtherPatientNames": "X",
    "OtherPatientIDsSequence": "X",
    "PatientBirthName": "X",
    "PatientMotherBirthName": "X",
    "MedicalRecordLocator": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPatientAliasSequence": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "EthnicGroup": "X",
    "EthnicGroupCodeSequence": "X",
    "Occupation": "X",
    "SmokingStatus": "X",
    "AdditionalPatientHistory": "X",
    "PregnancyStatus": "X",
    "LastMenstrualDate": "X",
    "PatientReligiousPreference": "X",
    "PatientComments": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "SpecialNeeds": "X",
    "PatientState": "X",
    "ResponsiblePerson": "X",
    "ResponsiblePersonRole": "X",
    "ResponsibleOrganization": "X",
    "PatientInstitutionResidence": "X",
    "PatientTransportArrangements": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    "InsurancePlanIdentification": "X",
    "PersonName": "D",
    "PersonAddress": "X",
    "PersonTelephoneNumbers": "X",
    "PersonTelecomInformation": "X",
    "PersonIdentificationCodeSequence": "D",
    # Visit and admission
    "AdmissionID": "X",
    "IssuerOfAdmissionIDSequence": "X",
    "AdmittingDate": "X",
    "AdmittingTime": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "DischargeDate": "X",
    "DischargeTime": "X",
    "DischargeDiagnosisDescription": "X",
    "ScheduledAdmissionDate": "X",
    "ScheduledAdmissionTime": "X",
    "ScheduledDischargeDate": "X",
    "ScheduledDischargeTime": "X",
    "ScheduledPatientInstitutionResidence": "X",
    "CurrentPatientLocation": "X",
    "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X",
    "IssuerOfServiceEpisodeIDSequence": "X",
    "VisitComments": "X",
    "ReasonForVisit": "X",
    "ReasonForVisitCodeSequence": "X",
    # Study
    "StudyInstanceUID": "U",
    "StudyDate": "Z",
    "StudyTime": "Z",
    "StudyID": "Z",
    "AccessionNumber": "Z",
    "IssuerOfAccessionNumberSequence": "X",
    "StudyDescription": "X",
    "StudyComments": "X",
    "StudyIDIssuer": "X",
    "StudyVerifiedDate": "X",
    "StudyVerifiedTime": "X",
    "StudyReadDate": "X",
    "StudyReadTime": "X",
    "StudyArrivalDate": "X",
    "StudyArrivalTime": "X",
    "StudyCompletionDate": "X",
    "StudyCompletionTime": "X",
    "ScheduledStudyStartDate": "X",
    "ScheduledStudyStartTime": "X",
    "ScheduledStudyStopDate": "X",
    "ScheduledStudyStopTime": "X",
    "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    "ReasonForStudy": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "RequestedContrastAgent": "X",
    "RequestedProcedureDescription": "X/Z",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ConsultingPhysicianName": "X",
    "ConsultingPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "OperatorsName": "X/Z/D",
    "OperatorIdentificationSequence": "X/D",
    "ReferencedStudySequence": "X/Z",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedImageSequence": "X/Z/U*",
    "SourceImageSequence": "X/Z/U*",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedSOPInstanceUIDInFile": "U",
    "IdentifyingComments": "X",
    "DerivationDescription": "X",
    # Series and equipment
    "SeriesInstanceUID": "U",
    "SeriesDate": "X",
    "SeriesTime": "X",
    "SeriesDescription": "X",
    "ProtocolName": "X/D",
    "InstitutionName": "X/Z/D",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X",
    "StationName": "X/Z/D",
    "DeviceSerialNumber": "X/Z/D",
    "DeviceUID": "U",
    "DetectorID": "X/D",
    "GantryID": "X",
    "GeneratorID": "X",
    "PlateID": "X",
    "CassetteID": "X",
    "SourceSerialNumber": "X",
    "UniqueDeviceIdentifier": "X",
    "UDISequence": "X",
    "ModifyingDeviceID": "X",
    "ModifyingDeviceManufacturer": "X",
    "ModifiedImageDescription": "X",
    "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X",
    "DateOfLastDetectorCalibration": "X",
    "TimeOfLastDetectorCalibration": "X",
    "DateOfSecondaryCapture": "X",
    "TimeOfSecondaryCapture": "X",
    "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionComments": "X",
    "AcquisitionProtocolDescription": "X",
    "ContrastBolusAgent": "Z/D",
    "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U",
    "DimensionOrganizationUID": "U",
    "ConcatenationUID": "U",
    "IrradiationEventUID": "U",
    "DoseReferenceUID": "U",
    "FiducialUID": "U",
    "LargePaletteColorLookupTableUID": "U",
    "PaletteColorLookupTableUID": "U",
    "StorageMediaFileSetUID": "U",
    "StorageMediaFileSetID": "X",
    "CreatorVersionUID": "U",
    "ContextGroupExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U",
    "TemplateExtensionCreatorUID": "U",
    "PresentationDisplayCollectionUID": "U",
    "PresentationSequenceCollectionUID": "U",
    "TransactionUID": "U",
    "FailedSOPInstanceUIDList": "U",
    "UID": "U",
    "SpecimenUID": "U",
    "ReferencedObservationUIDTrial": "U",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",
    # Instance
    "SOPInstanceUID": "U",
    "InstanceCreatorUID": "U",
    "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D",
    "InstanceCoercionDateTime": "X",
    "ContentDate": "Z/D",
    "ContentTime": "Z/D",
    "AcquisitionDate": "X/Z",
    "AcquisitionTime": "X/Z",
    "AcquisitionDateTime": "X/Z/D",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "FrameAcquisitionDateTime": "X",
    "FrameReferenceDateTime": "X",
    "StartAcquisitionDateTime": "X",
    "EndAcquisitionDateTime": "X",
    "DecayCorrectionDateTime": "X",
    "RadiopharmaceuticalStartTime": "X",
    "RadiopharmaceuticalStartDateTime": "X",
    "RadiopharmaceuticalStopTime": "X",
    "RadiopharmaceuticalStopDateTime": "X",
    "TimezoneOffsetFromUTC": "X",
    "ImageComments": "X",
    "FrameComments": "X",
    "ImagePresentationComments": "X",
    "IconImageSequence": "X",
    "TextString": "X",
    "TextComments": "X",
    "Arbitrary": "X",
    "ContentCreatorName": "Z",
    "ContentCreatorIdentificationCodeSequence": "X",
    "GraphicAnnotationSequence": "D",
    "ReviewerName": "X/Z",
    "DigitalSignatureUID": "X",
    "DigitalSignaturesSequence": "X",
    "ReferencedDigitalSignatureSequence": "X",
    "ReferencedSOPInstanceMACSequence": "X",
    "MAC": "X",
    "MACParametersSequence": "X",
    "EncryptedAttributesSequence": "X",
    "OriginalAttributesSequence": "X",
    "ModifiedAttributesSequence": "X",
    "DataSetTrailingPadding": "X",
    "HL7StructuredDocumentReferenceSequence": "X",
    # Structured reports
    "ContentSequence": "X",
    "AcquisitionContextSequence": "X",
    "AuthorObserverSequence": "X",
    "ParticipantSequence": "X",
    "CustodialOrganizationSequence": "X",
    "VerifyingObserverSequence": "D",
    "VerifyingObserverName": "D",
    "VerifyingObserverIdentificationCodeSequence": "Z",
    "VerifyingOrganization": "X",
    "ObservationDateTime": "X/D",
    "PredecessorDocumentsSequence": "X/Z/U*",
    "IdenticalDocumentsSequence": "X/Z/U*",
    "CurrentRequestedProcedureEvidenceSequence": "X/Z/U*",
    "PertinentOtherEvidenceSequence": "X/Z/U*",
    # Requests and procedure steps
    "RequestAttributesSequence": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureLocation": "X",
    "ReasonForTheRequestedProcedure": "X",
    "ReasonForTheImagingServiceRequest": "X",
    "ImagingServiceRequestComments": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X",
    "OrderCallbackTelecomInformation": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledStationAETitle": "X",
    "ScheduledStationName": "X",
    "ScheduledStationNameCodeSequence": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X",
    "ScheduledHumanPerformersSequence": "X",
    "PreMedication": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepStartDateTime": "X",
    "PerformedProcedureStepEndDateTime": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "PerformedLocation": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationName": "X",
    "PerformedStationNameCodeSequence": "X",
    "PerformedStationGeographicLocationCodeSequence": "X",
    "ActualHumanPerformersSequence": "X",
    "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X",
    "ProcedureStepCancellationDateTime": "X",
    "ExpectedCompletionDateTime": "X",
    # Interpretation and results (retired, still found in old objects)
    "InterpretationRecorder": "X",
    "InterpretationTranscriber": "X",
    "InterpretationText": "X",
    "InterpretationAuthor": "X",
    "InterpretationApproverSequence": "X",
    "PhysicianApprovingInterpretation": "X",
    "InterpretationDiagnosisDescription": "X",
    "ResultsDistributionListSequence": "X",
    "DistributionName": "X",
    "DistributionAddress": "X",
    "InterpretationIDIssuer": "X",
    "Impressions": "X",
    "ResultsComments": "X",
    "ResultsIDIssuer": "X",
    # Media and topics
    "TopicTitle": "X",
    "TopicSubject": "X",
    "TopicAuthor": "X",
    "TopicKeywords": "X",
    "SpecimenAccessionNumber": "X",
    "ContainerIdentifier": "Z",
    "SpecimenIdentifier": "Z",
}

# Attributes the options of Table E.1-1 keep (K) or clean (C) instead of the Basic Profile action.
PATIENT_CHARACTERISTICS: Final = frozenset(
    {
        "PatientAge",
        "PatientSex",
        "PatientSexNeutered",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "EthnicGroupCodeSequence",
        "PregnancyStatus",
        "SmokingStatus",
    }
)
DEVICE_IDENTITY: Final = frozenset(
    {
        "StationName",
        "DeviceSerialNumber",
        "DeviceUID",
        "DetectorID",
        "GantryID",
        "GeneratorID",
        "PlateID",
        "CassetteID",
        "SourceSerialNumber",
        "UniqueDeviceIdentifier",
        "UDISequence",
        "ModifyingDeviceID",
        "ModifyingDeviceManufacturer",
        "DateOfLastCalibration",
        "TimeOfLastCalibration",
        "DateOfLastDetectorCalibration",
        "TimeOfLastDetectorCalibration",
    }
)
INSTITUTION_IDENTITY: Final = frozenset(
    {
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionCodeSequence",
        "InstitutionalDepartmentName",
        "InstitutionalDepartmentTypeCodeSequence",
    }
)
DESCRIPTORS: Final = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "ImageComments",
        "FrameComments",
        "DerivationDescription",
        "AcquisitionComments",
        "AcquisitionProtocolDescription",
        "AcquisitionDeviceProcessingDescription",
        "ContrastBolusAgent",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "PerformedProcedureStepDescription",
        "ReasonForStudy",
    }
)
# Dates and times that no temporal option retains: they date the patient, not the examination.
PATIENT_DATES: Final = frozenset(
    {
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthDateInAlternativeCalendar",
        "PatientDeathDateInAlternativeCalendar",
        "LastMenstrualDate",
    }
)

# UIDs that name a definition (a SOP class, transfer syntax, coding scheme ...), never an instance:
# kept as they are even when they are private UIDs that the UID registry does not know.
DEFINITION_UID_TAGS: Final = frozenset(
    tag_for_keyword(k) or 0
    for k in (
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "ReferencedTransferSyntaxUIDInFile",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "SOPClassesInStudy",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
        "TransferSyntaxUID",
        "MediaStorageSOPClassUID",
        "ImplementationClassUID",
        "ReferencedColorPaletteInstanceUID",
    )
)

# Codes of CID 7050 (De-identification Method) and the text kept in De-identification Method.
BASIC_PROFILE: Final = ("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS: Final = ("113105", "Clean Descriptors Option")
RETAIN_FULL_DATES: Final = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
RETAIN_MODIFIED_DATES: Final = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
RETAIN_PATIENT_CHARACTERISTICS: Final = ("113108", "Retain Patient Characteristics Option")
RETAIN_DEVICE_IDENTITY: Final = ("113109", "Retain Device Identity Option")
RETAIN_INSTITUTION_IDENTITY: Final = ("113112", "Retain Institution Identity Option")

DUMMY_TEXT: Final = "ANONYMIZED"
DUMMY_DATE: Final = "19000101"
DUMMY_TIME: Final = "000000"
_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_FREE_TEXT_VRS: Final = frozenset({"LT", "ST", "UT"})
_NUMBER_VRS: Final = frozenset({"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
_MAX_LENGTH: Final = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "LT": 10240, "ST": 1024}
_MAX_DEPTH: Final = 32  # deeper nesting than ingest accepts (16) never reaches the profile


class DateMode(Enum):
    """What happens to examination dates and times."""

    REMOVE = "remove"  # the Basic Profile
    MODIFIED = "modified"  # Retain Longitudinal Temporal Information with Modified Dates
    FULL = "full"  # Retain Longitudinal Temporal Information with Full Dates


@dataclass(frozen=True, slots=True)
class Options:
    """The options of Table E.1-1 the caller chose (private attributes are always removed)."""

    dates: DateMode = DateMode.REMOVE
    patient_characteristics: bool = False
    device_identity: bool = False
    institution_identity: bool = False
    clean_descriptors: bool = False

    def methods(self) -> list[tuple[str, str]]:
        """The CID 7050 codes (value, meaning) of the profile and the chosen options."""
        chosen = [BASIC_PROFILE]
        if self.clean_descriptors:
            chosen.append(CLEAN_DESCRIPTORS)
        if self.dates is DateMode.FULL:
            chosen.append(RETAIN_FULL_DATES)
        if self.dates is DateMode.MODIFIED:
            chosen.append(RETAIN_MODIFIED_DATES)
        if self.patient_characteristics:
            chosen.append(RETAIN_PATIENT_CHARACTERISTICS)
        if self.device_identity:
            chosen.append(RETAIN_DEVICE_IDENTITY)
        if self.institution_identity:
            chosen.append(RETAIN_INSTITUTION_IDENTITY)
        return chosen

    def names(self) -> list[str]:
        """The chosen options as lowercase codes (for the audit record)."""
        out = []
        if self.dates is not DateMode.REMOVE:
            out.append(f"dates_{self.dates.value}")
        for flag, name in (
            (self.patient_characteristics, "patient_characteristics"),
            (self.device_identity, "device_identity"),
            (self.institution_identity, "institution_identity"),
            (self.clean_descriptors, "clean_descriptors"),
        ):
            if flag:
                out.append(name)
        return out


def _tags(keywords: Iterable[str]) -> frozenset[int]:
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        tags.add(int(tag))
    return frozenset(tags)


_PROFILE_BY_TAG: Final = {int(tag_for_keyword(k) or 0): a for k, a in PROFILE_ACTIONS.items()}
_PATIENT_DATE_TAGS: Final = _tags(PATIENT_DATES)


def actions_for(options: Options) -> dict[int, str]:
    """The action of every attribute of the table, by tag, with the chosen options applied."""
    actions = dict(_PROFILE_BY_TAG)
    kept: set[str] = set()
    if options.patient_characteristics:
        kept |= PATIENT_CHARACTERISTICS
    if options.device_identity:
        kept |= DEVICE_IDENTITY
    if options.institution_identity:
        kept |= INSTITUTION_IDENTITY
    for tag in _tags(kept):
        actions[tag] = "K"
    if options.clean_descriptors:
        for tag in _tags(DESCRIPTORS):
            actions[tag] = "C"
    return actions


# -- UIDs and dates --------------------------------------------------------------------------------
@dataclass
class UidMap:
    """Replaces UIDs consistently: the same original UID always becomes the same new one (``2.25.*``)."""

    mapping: dict[str, str] = field(default_factory=dict)

    def __call__(self, original: str) -> str:
        original = original.strip("\x00 ")
        if not original:
            return original
        new = self.mapping.get(original)
        if new is None:
            new = str(generate_uid(prefix=None))
            self.mapping[original] = new
        return new


def random_day_offset() -> int:
    """A shift for the Modified Dates option: 1 to 10 years back, whole days (weekday not kept)."""
    return -(365 + secrets.randbelow(9 * 365))


def shift_date(value: str, days: int) -> str:
    """A DA value (YYYYMMDD) moved by ``days``; empty when it is not a full date."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return ""
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return moved.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str:
    """A DT value moved by ``days`` (its time of day and offset kept); empty without a full date."""
    text = value.strip()
    moved = shift_date(text[:8], days)
    return moved + text[8:] if moved else ""


# -- cleaning descriptors --------------------------------------------------------------------------
_DATE_LIKE = re.compile(
    r"\b(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|(?:19|20)\d{6})\b"
)
_LONG_NUMBER = re.compile(r"\b\d{5,}\b")  # record numbers, phone numbers, IDs
_EMAIL = re.compile(r"\S+@\S+")
_SPACES = re.compile(r"\s{2,}")


def identifying_values(ds: Dataset, actions: dict[int, str]) -> frozenset[str]:
    """Text the profile removes from ``ds`` (names and their parts, IDs, addresses ...), for ``clean``."""
    found: set[str] = set()

    def visit(node: Dataset, depth: int) -> None:
        for element in _elements(node):
            if element.VR == "SQ" and depth < _MAX_DEPTH:
                for item in element.value or ():
                    visit(item, depth + 1)
                continue
            action = actions.get(int(element.tag))
            removed = action is not None and action not in ("K", "C", "U")
            if element.VR != "PN" and not (removed and element.VR in _TEXT_VRS | {"DA", "DT"}):
                continue
            for value in _strings(element):
                found.add(value)
                if element.VR == "PN":
                    found.update(p for p in re.split(r"[\^=\s,]+", value) if len(p) >= 2)
                if element.VR in ("DA", "DT") and len(value) >= 8 and value[:8].isdigit():
                    y, m, d = value[:4], value[4:6], value[6:8]
                    found.update({f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"})

    visit(ds, 0)
    return frozenset(v for v in found if len(v) >= 2)


def clean_text(text: str, needles: frozenset[str], limit: int | None) -> str:
    """``text`` without the identifying values, dates, long numbers and e-mail addresses it contains."""
    for needle in sorted(needles, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(needle)}(?!\w)", " ", text, flags=re.IGNORECASE)
    for pattern in (_DATE_LIKE, _LONG_NUMBER, _EMAIL):
        text = pattern.sub(" ", text)
    text = _SPACES.sub(" ", text).strip(" -_,;:/")
    return text[:limit] if limit else text


# -- applying the profile --------------------------------------------------------------------------
@dataclass
class Deidentifier:
    """Applies the profile with ``options`` to data sets of one copy (one ``UidMap``, one date shift)."""

    options: Options
    uids: UidMap = field(default_factory=UidMap)
    day_offset: int = field(default_factory=random_day_offset)
    patient_name: str | None = None  # a pseudonym for the copy instead of an empty Patient's Name
    patient_id: str | None = None  # a pseudonym for the copy instead of an empty Patient ID
    _actions: dict[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self._actions = actions_for(self.options)

    def apply(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place (the header: Pixel Data is never touched) and mark it as such."""
        needles = identifying_values(ds, self._actions) if self.options.clean_descriptors else frozenset()
        self._dataset(ds, needles, 0)
        self._mark(ds)

    # The walk: each element's action is decided once, by tag, then by the safety net.
    def _dataset(self, ds: Dataset, needles: frozenset[str], depth: int) -> None:
        for tag in list(ds.keys()):
            try:
                element = ds[tag]
            except Exception:  # an undecodable element cannot be judged: removed
                del ds[tag]
                continue
            action = self._action(element)
            self._act(ds, element, action, needles, depth)

    def _action(self, element: DataElement) -> str:
        tag = int(element.tag)
        group, number = tag >> 16, tag & 0xFFFF
        if group % 2 == 1 or number == 0 or group & 0xFF00 in (0x5000, 0x6000) or element.VR == "UN":
            return "X"  # private, group length, curve, overlay (the whole plane), unknown
        action = self._actions.get(tag)
        if action is not None:
            if element.VR in ("DA", "DT", "TM") and tag not in _PATIENT_DATE_TAGS:
                return self._temporal(element.VR, action)
            return action
        return self._safety_net(element)

    def _temporal(self, vr: str, action: str) -> str:
        if self.options.dates is DateMode.FULL:
            return "K"
        if self.options.dates is DateMode.MODIFIED:
            return "K" if vr == "TM" else "SHIFT"
        return action

    def _safety_net(self, element: DataElement) -> str:
        vr = element.VR
        if vr == "PN":
            return "Z"
        if vr in _FREE_TEXT_VRS:
            return "X"
        if vr in ("DA", "DT"):
            return {DateMode.FULL: "K", DateMode.MODIFIED: "SHIFT"}.get(self.options.dates, "Z")
        if vr == "UI" and int(element.tag) not in DEFINITION_UID_TAGS:
            return "U*"  # replaced unless it is a registered (well-known) UID
        return "K"  # a sequence is kept with its items de-identified; anything else is kept

    def _act(
        self, ds: Dataset, element: DataElement, action: str, needles: frozenset[str], depth: int
    ) -> None:
        vr = element.VR
        tag = element.tag
        action = _resolve_sequence(action) if vr == "SQ" else _resolve(action)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            element.value = Sequence() if vr == "SQ" else None
        elif action == "D":
            self._dummy(ds, element, depth)
        elif action in ("U", "U*"):
            if vr == "UI":
                self._replace_uids(element, only_unregistered=action == "U*")
            elif vr == "SQ":
                self._items(element, needles, depth)
            else:
                del ds[tag]  # a U action on something that is not a UID: nothing safe to keep
        elif action == "C":
            self._clean(ds, element, needles)
        elif action == "SHIFT":
            self._shift(element)
        elif vr == "SQ":  # K: kept, its items de-identified
            self._items(element, needles, depth)

    def _items(self, element: DataElement, needles: frozenset[str], depth: int) -> None:
        if depth >= _MAX_DEPTH:
            element.value = Sequence()
            return
        for item in element.value or ():
            self._dataset(item, needles, depth + 1)

    def _replace_uids(self, element: DataElement, *, only_unregistered: bool) -> None:
        values = _strings(element)
        new = [v if only_unregistered and _registered(v) else self.uids(v) for v in values]
        element.value = new[0] if len(new) == 1 else new or None

    def _dummy(self, ds: Dataset, element: DataElement, depth: int) -> None:
        """D: a value of the element's VR that says nothing; every leaf of a sequence likewise."""
        vr = element.VR
        if vr == "SQ":
            for item in element.value or ():
                for tag in list(item.keys()):
                    try:
                        child = item[tag]
                    except Exception:
                        del item[tag]
                        continue
                    if int(tag) >> 16 & 1:
                        del item[tag]
                    elif child.VR == "UI":
                        self._replace_uids(child, only_unregistered=True)
                    elif depth < _MAX_DEPTH:
                        self._dummy(item, child, depth + 1)
                    else:
                        del item[tag]
            return
        if vr in _TEXT_VRS:
            element.value = DUMMY_TEXT
        elif vr == "DA":
            element.value = self._dated(element, DUMMY_DATE)
        elif vr == "DT":
            element.value = self._dated(element, DUMMY_DATE + DUMMY_TIME)
        elif vr == "TM":
            element.value = DUMMY_TIME
        elif vr in ("DS", "IS"):
            element.value = "0"
        elif vr == "AS":
            element.value = "000Y"
        elif vr in _NUMBER_VRS:
            element.value = 0
        elif vr == "UI":
            self._replace_uids(element, only_unregistered=False)
        else:
            del ds[element.tag]

    def _dated(self, element: DataElement, dummy: str) -> str:
        if self.options.dates is not DateMode.MODIFIED:
            return dummy
        values = _strings(element)
        shift = shift_date if element.VR == "DA" else shift_datetime
        return (shift(values[0], self.day_offset) if values else "") or dummy

    def _shift(self, element: DataElement) -> None:
        shift = shift_date if element.VR == "DA" else shift_datetime
        moved = [shift(v, self.day_offset) for v in _strings(element)]
        kept = [v for v in moved if v]
        element.value = kept[0] if len(kept) == 1 else kept or None

    def _clean(self, ds: Dataset, element: DataElement, needles: frozenset[str]) -> None:
        if element.VR not in _TEXT_VRS:
            del ds[element.tag]
            return
        limit = _MAX_LENGTH.get(element.VR)
        cleaned = [clean_text(v, needles, limit) for v in _strings(element)]
        kept = [v for v in cleaned if v]
        element.value = kept[0] if len(kept) == 1 else kept or None

    def _mark(self, ds: Dataset) -> None:
        """Patient Identity Removed, the method and its codes, and the state of temporal information."""
        if self.patient_name is not None:
            ds.PatientName = self.patient_name
        if self.patient_id is not None:
            ds.PatientID = self.patient_id
        methods = self.options.methods()
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [f"cloudpacs: PS3.15 E.1 {meaning}"[:64] for _, meaning in methods]
        codes = Sequence()
        for value, meaning in methods:
            code = Dataset()
            code.CodeValue = value
            code.CodingSchemeDesignator = "DCM"
            code.CodeMeaning = meaning
            codes.append(code)
        ds.DeidentificationMethodCodeSequence = codes
        ds.LongitudinalTemporalInformationModified = {
            DateMode.REMOVE: "REMOVED",
            DateMode.MODIFIED: "MODIFIED",
            DateMode.FULL: "UNMODIFIED",
        }[self.options.dates]


def _resolve(action: str) -> str:
    """A compound action resolved for a plain element: D where allowed, else Z, else X."""
    if "/" not in action:
        return action
    choices = action.replace("*", "").split("/")
    for choice in ("D", "Z", "U", "X"):
        if choice in choices:
            return choice
    return "X"


def _resolve_sequence(action: str) -> str:
    """A compound action resolved for a sequence: U (keep, UIDs replaced) or Z (empty) where allowed."""
    if action == "X/Z/U*":
        return "U"
    if "/" not in action:
        return action
    choices = action.split("/")
    for choice in ("Z", "D", "X"):
        if choice in choices:
            return choice
    return "X"


def _elements(ds: Dataset) -> list[DataElement]:
    out = []
    for tag in list(ds.keys()):
        try:
            out.append(ds[tag])
        except Exception:  # noqa: S112 - undecodable elements are removed by the walk itself
            continue
    return out


def _strings(element: DataElement) -> list[str]:
    """The values of a text element as strings (empty values dropped)."""
    value: Any = element.value
    if value is None or value == "":
        return []
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v) for v in values if v is not None and str(v) != ""]


def _registered(uid: str) -> bool:
    """Whether ``uid`` is in the UID registry (a class, transfer syntax, coding scheme, frame of reference)."""
    return UID(uid).name != uid
