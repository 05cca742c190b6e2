"""The whole-system fixtures of tests/http (both deployment modes), shared with the render tests."""

from tests.http.conftest import auth_headers, clinician, deployment, system

__all__ = ["auth_headers", "clinician", "deployment", "system"]
