"""DICOMweb media types, transfer syntaxes and response tags as named constants."""

from __future__ import annotations

APPLICATION_DICOM = "application/dicom"
APPLICATION_DICOM_JSON = "application/dicom+json"
APPLICATION_JSON = "application/json"
MULTIPART_RELATED = "multipart/related"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# PS3.18 8.7.3.5.2: without a transfer-syntax parameter, application/dicom means Explicit VR Little Endian.
DEFAULT_TRANSFER_SYNTAX = EXPLICIT_VR_LITTLE_ENDIAN
ANY_TRANSFER_SYNTAX = "*"

# STOW-RS response attributes (PS3.18 Table 10.5.3-1) and failure reasons (PS3.4 / PS3.18 10.5.3).
TAG_RETRIEVE_URL = "00081190"
TAG_FAILED_SOP_SEQUENCE = "00081198"
TAG_REFERENCED_SOP_SEQUENCE = "00081199"
TAG_REFERENCED_SOP_CLASS_UID = "00081150"
TAG_REFERENCED_SOP_INSTANCE_UID = "00081155"
TAG_FAILURE_REASON = "00081197"
TAG_WARNING_REASON = "00081196"

FAILURE_PROCESSING = 0x0110
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DATASET_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
# dcm4chee and others use 0x0111 "Duplicate SOP Instance" for a different object with an existing UID.
FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111
# PS3.7 "Refused: Not Authorized": the study (or SOP Instance UID) belongs to another organization.
FAILURE_NOT_AUTHORIZED = 0x0124
