"""Absolute URLs in responses (RetrieveURL, BulkDataURI, STOW's ReferencedSOPSequence) use the configured public
base URL, never the request's Host header: behind an Ingress or the gateway the Host may be internal, some
clients send it without the port, and a forged Host must not be able to poison the URLs a viewer follows."""

from __future__ import annotations

from pacslib.settings import ServiceSettings

DICOMWEB_PATH = "/dicom-web"


def dicomweb_base(settings: ServiceSettings) -> str:
    """The public DICOMweb base URL: ``<public base URL>/dicom-web`` (the public base URL is the issuer)."""
    return settings.auth_issuer.rstrip("/") + DICOMWEB_PATH
