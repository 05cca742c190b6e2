"""Session-wide fixtures: the real S3, MongoDB- and Kafka-protocol servers, started once when a test needs them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.realservers import kafka_server, mongo_server, s3_server

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


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address (``host:port``) of a noida-db Kafka-protocol broker running for the whole session.

    Tests isolate themselves by topic and group names; a test that restarts a broker starts its own
    (``tests.realservers.kafka_server``).
    """
    started = time.monotonic()
    with kafka_server(tmp_path_factory.mktemp("noida")) as broker:
        _startup_seconds["noida-db (Kafka protocol)"] = time.monotonic() - started
        yield broker.bootstrap


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how long the real servers took to become ready."""
    if _startup_seconds:
        terminalreporter.write_sep("-", "real test servers")
        for name, seconds in _startup_seconds.items():
            terminalreporter.write_line(f"{name}: ready in {seconds:.2f} s")
