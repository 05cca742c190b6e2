"""Key-encryption keys (KEKs): a keyring file that wraps and unwraps per-object data keys.

The file is JSON: ``{"version": 1, "active": "<id>", "keys": {"<id>": "<base64 of 32 bytes>", ...}}``.
Embedded mode creates it; in Kubernetes it is a mounted Secret. Callers depend only on ``KeyWrapper``,
so a KMS-backed implementation can replace the file later.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import secrets
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacslib.envelope import KEY_SIZE, IntegrityError

FILE_VERSION = 1
KEK_SIZE = 32
WRAP_NONCE_SIZE = 12
WRAPPED_SIZE = WRAP_NONCE_SIZE + KEY_SIZE + 16  # nonce | encrypted DEK | GCM tag
KEK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_WRAP_AAD_LABEL = b"cloudpacs/kek-wrap/v1\x00"


class KeyringError(Exception):
    """The keyring file is missing, unreadable or invalid, or a KEK id is unknown."""


class KeyWrapper(Protocol):
    """What callers need from a KEK provider (keyring file today, a KMS tomorrow)."""

    @property
    def active_id(self) -> str:
        """Id of the KEK that wraps new data keys."""
        ...

    def wrap(self, dek: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap ``dek`` with the active KEK; return ``(kek_id, wrapped)``."""
        ...

    def unwrap(self, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Unwrap a data key wrapped by ``kek_id`` under the same ``context``."""
        ...

    def rewrap(self, kek_id: str, wrapped: bytes, context: bytes) -> tuple[str, bytes]:
        """Unwrap, then wrap again with the active KEK."""
        ...


def new_kek_id(now: datetime | None = None) -> str:
    """Return a fresh KEK id such as ``kek-20261123T164500Z-1a2b3c4d``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"kek-{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _wrap_aad(context: bytes, kek_id: str) -> bytes:
    # Length-prefixing the context keeps (context, kek_id) pairs from colliding when concatenated.
    return _WRAP_AAD_LABEL + struct.pack(">I", len(context)) + context + kek_id.encode("utf-8")


class Keyring:
    """A file of KEKs, one of them active; satisfies ``KeyWrapper``.

    Every ``wrap``/``unwrap`` checks (one ``stat``) whether the file changed on disk and re-reads it, so a
    rotation by another process, a Secret update or a removed KEK takes effect without a restart.
    """

    def __init__(self, path: Path, active: str, keys: dict[str, bytes], stamp: tuple[int, ...]) -> None:
        self._path = path
        self._active = active
        self._keys = keys
        self._stamp = stamp

    def __repr__(self) -> str:
        return f"Keyring(path={str(self._path)!r}, active={self._active!r}, ids={self.ids()!r})"

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Load and validate a keyring file."""
        active, keys, stamp = _read(path)
        return cls(path, active, keys, stamp)

    @classmethod
    def create(cls, path: Path) -> Keyring:
        """Create a new keyring file (mode 0600) with one random KEK; never overwrite an existing file."""
        try:
            return cls._create(path)
        except FileExistsError:
            raise KeyringError(f"keyring file {path} already exists; refusing to overwrite it") from None

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        """Load the keyring file, creating it first if it does not exist."""
        if path.exists():
            return cls.load(path)
        try:
            return cls._create(path)
        except FileExistsError:  # another process created it first
            return cls.load(path)

    @classmethod
    def _create(cls, path: Path) -> Keyring:
        kek_id = new_kek_id()
        keys = {kek_id: AESGCM.generate_key(bit_length=256)}
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomic(path, _serialize(kek_id, keys), replace=False)
        except FileExistsError:
            raise
        except OSError as exc:
            raise KeyringError(f"cannot create keyring file {path}: {exc.strerror}") from None
        return cls.load(path)

    @property
    def path(self) -> Path:
        """The keyring file."""
        return self._path

    @property
    def active_id(self) -> str:
        """Id of the KEK that wraps new data keys."""
        return self._active

    def ids(self) -> list[str]:
        """All KEK ids in the keyring, sorted."""
        return sorted(self._keys)

    def refresh(self) -> bool:
        """Re-read the file if it changed on disk; return whether it did."""
        if _stamp(self._path) == self._stamp:
            return False
        self._active, self._keys, self._stamp = _read(self._path)
        return True

    def rotate(self) -> str:
        """Add a new random KEK, make it active, save the file atomically (0600) and return the new id."""
        try:
            with _locked_dir(self._path.parent):
                # Re-read under the lock so a concurrent rotation elsewhere is kept, not overwritten.
                _, keys, _ = _read(self._path)
                kek_id = new_kek_id()
                while kek_id in keys:
                    kek_id = new_kek_id()
                keys[kek_id] = AESGCM.generate_key(bit_length=256)
                _write_atomic(self._path, _serialize(kek_id, keys), replace=True)
        except OSError as exc:
            raise KeyringError(f"cannot write keyring file {self._path}: {exc.strerror}") from None
        self._active, self._keys, self._stamp = _read(self._path)
        return kek_id

    def wrap(self, dek: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap ``dek`` with the active KEK (AES-256-GCM, random nonce); return ``(kek_id, wrapped)``."""
        if len(dek) != KEY_SIZE:
            raise ValueError(f"data key must be {KEY_SIZE} bytes")
        self.refresh()
        kek_id = self._active
        nonce = os.urandom(WRAP_NONCE_SIZE)
        wrapped = AESGCM(self._keys[kek_id]).encrypt(nonce, dek, _wrap_aad(context, kek_id))
        return kek_id, nonce + wrapped

    def unwrap(self, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Unwrap a data key: IntegrityError if it fails to authenticate, KeyringError for an unknown id."""
        self.refresh()
        key = self._keys.get(kek_id)
        if key is None:
            raise KeyringError(f"unknown key-encryption key id {kek_id!r} (not in keyring file {self._path})")
        if len(wrapped) != WRAPPED_SIZE:
            raise IntegrityError(None, f"wrapped data key has {len(wrapped)} bytes, expected {WRAPPED_SIZE}")
        nonce, body = wrapped[:WRAP_NONCE_SIZE], wrapped[WRAP_NONCE_SIZE:]
        try:
            return AESGCM(key).decrypt(nonce, body, _wrap_aad(context, kek_id))
        except InvalidTag:
            raise IntegrityError(
                None, f"wrapped data key did not authenticate under {kek_id!r} (tampered or wrong context)"
            ) from None

    def rewrap(self, kek_id: str, wrapped: bytes, context: bytes) -> tuple[str, bytes]:
        """Unwrap with ``kek_id``, then wrap again with the active KEK; return ``(active_id, wrapped)``."""
        return self.wrap(self.unwrap(kek_id, wrapped, context), context)


def _stamp(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyringError(f"keyring file {path} does not exist") from None
    except OSError as exc:
        raise KeyringError(f"cannot read keyring file {path}: {exc.strerror}") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> tuple[str, dict[str, bytes], tuple[int, ...]]:
    """Read and validate a keyring file; return (active id, keys, change stamp)."""
    stamp = _stamp(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyringError(f"cannot read keyring file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError:
        # Never echo the parser's message: it may quote file content, i.e. key material.
        raise KeyringError(f"keyring file {path} is not valid UTF-8 JSON") from None
    active, keys = _validate(doc, path)
    return active, keys, stamp


def _validate(doc: Any, path: Path) -> tuple[str, dict[str, bytes]]:
    if not isinstance(doc, dict):
        raise KeyringError(f"keyring file {path} must hold a JSON object")
    unknown = set(doc) - {"version", "active", "keys"}
    if unknown:
        raise KeyringError(f"keyring file {path} has unknown fields: {', '.join(sorted(unknown))}")
    if doc.get("version") != FILE_VERSION:
        raise KeyringError(f"keyring file {path} has unsupported version (expected {FILE_VERSION})")
    entries = doc.get("keys")
    if not isinstance(entries, dict) or not entries:
        raise KeyringError(f"keyring file {path} has no keys")
    keys: dict[str, bytes] = {}
    for kek_id, encoded in entries.items():
        if not KEK_ID_PATTERN.fullmatch(kek_id):
            raise KeyringError(f"keyring file {path} has an invalid key id (letters, digits, '.', '_', '-')")
        try:
            key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except binascii.Error:
            key = b""
        if len(key) != KEK_SIZE:
            raise KeyringError(f"key {kek_id!r} in keyring file {path} is not base64 of {KEK_SIZE} bytes")
        keys[kek_id] = key
    active = doc.get("active")
    if not isinstance(active, str) or active not in keys:
        raise KeyringError(f"keyring file {path}: the active key id is missing or not among its keys")
    return active, keys


def _serialize(active: str, keys: dict[str, bytes]) -> bytes:
    doc = {
        "version": FILE_VERSION,
        "active": active,
        "keys": {kek_id: base64.b64encode(key).decode("ascii") for kek_id, key in sorted(keys.items())},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to a 0600 temp file, fsync it, then move it into place.

    With ``replace=False`` the move is a hard link, which fails with FileExistsError instead of
    overwriting, so two creators cannot clobber each other.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the keyring's directory (serializes rotations)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
