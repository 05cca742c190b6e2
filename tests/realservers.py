"""Start real protocol servers for tests: SecantusDB (MongoDB), the JuiceFS S3 gateway and noida-db (Kafka).

Each server runs in its own temporary directory on a free 127.0.0.1 port, is polled until it answers,
and is stopped at the end (SIGTERM, then SIGKILL after a timeout). Logs go to files in that directory;
when a server is missing or does not come up, the error names the command and shows the log's tail.
Nothing here skips: a missing server is a test ERROR.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.resources
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from pymongo import MongoClient
from pymongo.errors import PyMongoError

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3  # a free port can be taken by someone else between probing and binding
LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """A test server is not installed or did not become ready."""


def venv_executable(name: str) -> Path:
    """Return the path of a console script installed next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ServerStartError(
            f"{name} is not installed next to {sys.executable} (expected {path}); "
            "install the test dependencies into the virtualenv first"
        )
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of a log file (or a note that it is empty/missing)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log file at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(log file {path} is empty)"


def _run_once(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a short setup command, raising ServerStartError with its output when it fails."""
    with log.open("ab") as out:
        result = subprocess.run(
            list(args), stdout=out, stderr=subprocess.STDOUT, env=env, timeout=START_TIMEOUT, check=False
        )
    if result.returncode != 0:
        raise ServerStartError(
            f"setup command failed with exit code {result.returncode}: {' '.join(args)}\n"
            f"--- tail of {log} ---\n{log_tail(log)}"
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server process, killing it when it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def _server(
    name: str,
    make_args: Callable[[int], list[str]],
    ready: Callable[[int], bool],
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[int]:
    """Start a server on a free port, wait until ``ready(port)``, yield the port, stop it at the end."""
    last_error = ""
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        args = make_args(port)
        log_file: IO[bytes] = log.open("ab")
        try:
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            log_file.close()
            raise ServerStartError(f"cannot run {name} ({args[0]}): {exc}") from exc
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if ready(port):
                    break
                time.sleep(0.05)
            else:
                if proc.poll() is None:
                    raise ServerStartError(
                        f"{name} did not become ready on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s: "
                        f"{' '.join(args)}\n--- tail of {log} ---\n{log_tail(log)}"
                    )
                last_error = (
                    f"{name} exited with code {proc.returncode} while starting: {' '.join(args)}\n"
                    f"--- tail of {log} ---\n{log_tail(log)}"
                )
                continue
            yield port
            return
        finally:
            _stop(proc)
            log_file.close()
    raise ServerStartError(last_error)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def mongo_server(tmp: Path, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Run a SecantusDB daemon (single-node replica set ``secantus``) and yield its MongoDB URI.

    ``extra_args`` go to ``secantusd-py`` (the benchmark's bulk loads raise the oplog's limits).
    """
    exe = venv_executable("secantusd-py")
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "data"
    log = tmp / "secantusd.log"

    def args(port: int) -> list[str]:
        return [
            str(exe),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(data),
            "--sync-on-commit",
            *extra_args,
        ]

    def ready(port: int) -> bool:
        if not _tcp_open(port):
            return False
        client: MongoClient[dict[str, object]] = MongoClient(
            _mongo_uri(port), serverSelectionTimeoutMS=1000, connectTimeoutMS=1000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    with _server("SecantusDB (secantusd-py)", args, ready, log) as port:
        yield _mongo_uri(port)


def _mongo_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?replicaSet=secantus"


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[tuple[str, str, str]]:
    """Run the JuiceFS S3 gateway over a local file volume; yield ``(endpoint, access_key, secret_key)``.

    ``endpoint`` is ``host:port`` (plain HTTP), as the ``minio`` SDK expects it.
    """
    exe = venv_executable("juicefs")
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "juicefs.log"
    meta = f"sqlite3://{tmp / 'meta.db'}"
    access_key = "test-" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(24)
    _run_once(
        [
            str(exe),
            "format",
            "--storage",
            "file",
            "--bucket",
            f"{tmp / 'blobs'}/",
            "--trash-days",
            "0",
            "--no-update",
            meta,
            "vol",
        ],
        log,
    )
    env = {**os.environ, "MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
    cache_dir = tmp / "cache"

    def args(port: int) -> list[str]:
        return [
            str(exe),
            "--no-agent",
            "gateway",
            meta,
            f"127.0.0.1:{port}",
            "--multi-buckets",
            "--keep-etag",
            "--object-meta",
            "--no-usage-report",
            "--no-banner",
            "--cache-dir",
            str(cache_dir),
            "--metrics",
            f"127.0.0.1:{free_port()}",
            "--backup-meta",
            "0",
        ]

    def ready(port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/minio/health/live")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    try:
        with _server("JuiceFS S3 gateway (juicefs gateway)", args, ready, log, env=env) as port:
            yield f"127.0.0.1:{port}", access_key, secret_key
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def noida_binary() -> Path:
    """The noida-db server binary inside its wheel.

    The ``noida-db`` console script is a Python wrapper that runs this binary as a child process and
    does not pass signals on, so stopping the wrapper would leave the broker running: run the binary.
    """
    try:
        package = importlib.resources.files("noida_db")
    except ModuleNotFoundError as exc:
        raise ServerStartError(
            "noida-db is not installed in this virtualenv; install the test dependencies "
            "(requirements/dev.txt) first"
        ) from exc
    path = Path(str(package.joinpath("noida-db")))
    if not path.is_file():
        raise ServerStartError(f"the noida-db binary is missing from its package (expected {path})")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)  # the wrapper does the same before running it
    return path


class KafkaBroker:
    """A noida-db Kafka-protocol broker (single node) on a fixed port and data directory.

    ``restart()`` stops the broker gracefully and starts it again on the same port with the same data,
    as a rolling restart of a broker does to its clients.
    """

    def __init__(self, tmp: Path) -> None:
        self._exe = noida_binary()
        tmp.mkdir(parents=True, exist_ok=True)
        self.data_dir = tmp / "data"
        self.log = tmp / "noida-db.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def _args(self, port: int) -> list[str]:
        return [
            str(self._exe),
            "start",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--only",
            "kafka",
            "--kafka-port",
            str(port),
        ]

    def start(self) -> None:
        """Start on a free port (or on the port it had, after ``stop()``) and wait until it answers."""
        last_error = ""
        for _attempt in range(START_ATTEMPTS):
            port = self.port or free_port()
            args = self._args(port)
            self._log_file = self.log.open("ab")
            try:
                self._proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT)
            except OSError as exc:
                self._close_log()
                raise ServerStartError(f"cannot run noida-db ({args[0]}): {exc}") from exc
            deadline = time.monotonic() + START_TIMEOUT
            while self._proc.poll() is None and time.monotonic() < deadline:
                if kafka_ready(port):
                    self.port = port
                    return
                time.sleep(0.05)
            running = self._proc.poll() is None
            self.stop()
            if running:
                raise ServerStartError(
                    f"noida-db (Kafka) did not become ready on 127.0.0.1:{port} within "
                    f"{START_TIMEOUT:.0f} s: {' '.join(args)}\n--- tail of {self.log} ---\n{log_tail(self.log)}"
                )
            last_error = (
                f"noida-db (Kafka) exited while starting: {' '.join(args)}\n"
                f"--- tail of {self.log} ---\n{log_tail(self.log)}"
            )
        raise ServerStartError(last_error)

    def stop(self) -> None:
        """Stop the broker gracefully (its data stays in ``data_dir``)."""
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.contextmanager
def kafka_server(tmp: Path) -> Iterator[KafkaBroker]:
    """Run a noida-db Kafka-protocol broker; yield it (``.bootstrap``, ``.restart()``)."""
    broker = KafkaBroker(tmp)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def kafka_ready(port: int) -> bool:
    """True when a Kafka broker answers an ApiVersions request on 127.0.0.1:port."""
    client_id = b"cloudpacs-tests"
    correlation = 7
    # ApiVersions v0: api_key 18, api_version 0, correlation id, client id (int16-length string).
    body = (
        (18).to_bytes(2, "big")
        + (0).to_bytes(2, "big")
        + correlation.to_bytes(4, "big")
        + len(client_id).to_bytes(2, "big")
        + client_id
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(len(body).to_bytes(4, "big") + body)
            header = _recv_exactly(sock, 4)
            reply = _recv_exactly(sock, int.from_bytes(header, "big"))
    except OSError:
        return False
    # Response: correlation id (int32), error code (int16), ...
    return int.from_bytes(reply[:4], "big") == correlation and reply[4:6] == b"\x00\x00"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data
