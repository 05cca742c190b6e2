"""Session-wide fixtures: the real S3 and MongoDB-protocol servers, started once when a test needs them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.realservers import mongo_server, s3_server

_startup_seconds: dict[str, float] = {}


class S3Endpoint(NamedTuple):
    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a SecantusDB daemon running for the whole session."""
    started = time.monotonic()
    with mongo_server(tmp_path_factory.mktemp("secantus")) as uri:
        _startup_seconds["SecantusDB (MongoDB protocol)"] = time.monotonic() - started
        yield uri


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """Address and credentials of a JuiceFS S3 gateway running for the whole session."""
    started = time.monotonic()
    with s3_server(tmp_path_factory.mktemp("juicefs")) as (endpoint, access_key, secret_key):
        _startup_seconds["JuiceFS S3 gateway"] = time.monotonic() - started
        yield S3Endpoint(endpoint, access_key, secret_key)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how long the real servers took to become ready."""
    if _startup_seconds:
        terminalreporter.write_sep("-", "real test servers")
        for name, seconds in _startup_seconds.items():
            terminalreporter.write_line(f"{name}: ready in {seconds:.2f} s")
