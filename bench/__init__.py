"""Side-by-side DICOMweb benchmark of cloudpacs against Orthanc (``make bench``)."""
