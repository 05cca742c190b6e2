"""Unit tests for the KEK keyring file (pacslib.keyring)."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from pacslib.envelope import IntegrityError, dek_context, new_data_key
from pacslib.keyring import WRAPPED_SIZE, Keyring, KeyringError, KeyWrapper

CTX = dek_context("object-1")


def read_doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def write_doc(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keyring.json"


@pytest.fixture
def ring(path: Path) -> Keyring:
    return Keyring.create(path)


def test_create_writes_private_valid_file(ring: Keyring, path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = read_doc(path)
    assert doc["version"] == 1
    assert doc["active"] == ring.active_id
    assert list(doc["keys"]) == [ring.active_id] == ring.ids()
    assert len(base64.b64decode(doc["keys"][ring.active_id])) == 32
    assert re.fullmatch(r"kek-\d{8}T\d{6}Z-[0-9a-f]{8}", ring.active_id)
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"], "no temp files left behind"


def test_create_refuses_to_overwrite(ring: Keyring, path: Path) -> None:
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="already exists"):
        Keyring.create(path)
    assert path.read_bytes() == before


def test_keys_differ_between_keyrings(tmp_path: Path) -> None:
    a = read_doc(Keyring.create(tmp_path / "a.json").path)
    b = read_doc(Keyring.create(tmp_path / "b.json").path)
    assert set(a["keys"].values()).isdisjoint(b["keys"].values())


def test_load_or_create(path: Path) -> None:
    created = Keyring.load_or_create(path)
    loaded = Keyring.load_or_create(path)
    assert loaded.active_id == created.active_id
    dek = new_data_key()
    kek_id, wrapped = created.wrap(dek, CTX)
    assert loaded.unwrap(kek_id, wrapped, CTX) == dek


def test_wrap_unwrap_round_trip(ring: Keyring, path: Path) -> None:
    dek = new_data_key()
    kek_id, wrapped = ring.wrap(dek, CTX)
    assert kek_id == ring.active_id
    assert len(wrapped) == WRAPPED_SIZE
    assert dek not in wrapped
    assert ring.wrap(dek, CTX)[1] != wrapped, "random nonce per wrap"
    assert Keyring.load(path).unwrap(kek_id, wrapped, CTX) == dek


def test_wrapped_format_matches_documentation(ring: Keyring, path: Path) -> None:
    """Unwrap by hand following docs/envelope.md, without the library."""
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    dek = new_data_key()
    kek_id, wrapped = ring.wrap(dek, CTX)
    assert CTX == b"cloudpacs/dek/v1\x00object-1"
    kek = base64.b64decode(read_doc(path)["keys"][kek_id])
    aad = b"cloudpacs/kek-wrap/v1\x00" + struct.pack(">I", len(CTX)) + CTX + kek_id.encode()
    assert AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad) == dek


def test_keyring_satisfies_key_wrapper(ring: Keyring) -> None:
    wrapper: KeyWrapper = ring
    dek = new_data_key()
    assert wrapper.unwrap(*wrapper.wrap(dek, CTX), CTX) == dek


def test_wrap_rejects_bad_dek(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ring.wrap(b"short", CTX)


def test_wrapped_key_moved_to_another_object(ring: Keyring) -> None:
    kek_id, wrapped = ring.wrap(new_data_key(), dek_context("object-1"))
    with pytest.raises(IntegrityError):
        ring.unwrap(kek_id, wrapped, dek_context("object-2"))


def test_context_and_kek_id_cannot_be_shifted(tmp_path: Path) -> None:
    """AAD is length-prefixed: bytes moved from the KEK id into the context do not authenticate."""
    path = tmp_path / "keyring.json"
    same_key = base64.b64encode(bytes(range(32))).decode()
    write_doc(path, {"version": 1, "active": "ab", "keys": {"ab": same_key, "b": same_key}})
    ring = Keyring.load(path)
    kek_id, wrapped = ring.wrap(new_data_key(), b"c")
    assert kek_id == "ab"
    with pytest.raises(IntegrityError):
        ring.unwrap("b", wrapped, b"ca")  # naive concatenation would give the same AAD "cab"


@pytest.mark.parametrize("pos", [0, 11, 12, 30, WRAPPED_SIZE - 1])
def test_tampered_wrapped_key(ring: Keyring, pos: int) -> None:
    kek_id, wrapped = ring.wrap(new_data_key(), CTX)
    tampered = bytearray(wrapped)
    tampered[pos] ^= 0x01
    with pytest.raises(IntegrityError, match="did not authenticate"):
        ring.unwrap(kek_id, bytes(tampered), CTX)


@pytest.mark.parametrize("size", [0, WRAPPED_SIZE - 1, WRAPPED_SIZE + 1])
def test_wrapped_key_of_wrong_length(ring: Keyring, size: int) -> None:
    with pytest.raises(IntegrityError, match="expected 60"):
        ring.unwrap(ring.active_id, bytes(size), CTX)


def test_unknown_kek_id(ring: Keyring) -> None:
    _, wrapped = ring.wrap(new_data_key(), CTX)
    with pytest.raises(KeyringError, match="unknown key-encryption key id 'kek-nope'"):
        ring.unwrap("kek-nope", wrapped, CTX)


def test_rotate(ring: Keyring, path: Path) -> None:
    old_id = ring.active_id
    dek = new_data_key()
    _, old_wrapped = ring.wrap(dek, CTX)
    new_id = ring.rotate()
    assert new_id != old_id
    assert ring.active_id == new_id
    assert ring.ids() == sorted([old_id, new_id])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # New objects are wrapped with the new KEK; old wrapped keys still unwrap.
    kek_id, _ = ring.wrap(new_data_key(), CTX)
    assert kek_id == new_id
    assert ring.unwrap(old_id, old_wrapped, CTX) == dek
    reloaded = Keyring.load(path)
    assert reloaded.active_id == new_id
    assert reloaded.unwrap(old_id, old_wrapped, CTX) == dek
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json"]


def test_rewrap(ring: Keyring) -> None:
    dek = new_data_key()
    old_id, old_wrapped = ring.wrap(dek, CTX)
    new_id = ring.rotate()
    kek_id, rewrapped = ring.rewrap(old_id, old_wrapped, CTX)
    assert kek_id == new_id
    assert rewrapped != old_wrapped
    assert ring.unwrap(new_id, rewrapped, CTX) == dek
    with pytest.raises(IntegrityError):
        ring.unwrap(old_id, rewrapped, CTX)
    with pytest.raises(IntegrityError):
        ring.rewrap(old_id, old_wrapped, dek_context("object-2"))


def test_rotation_by_another_process_is_picked_up(ring: Keyring, path: Path) -> None:
    """A rotation written by another process (or a Secret update) reaches a running keyring."""
    other = Keyring.load(path)
    dek = new_data_key()
    new_id = other.rotate()
    kek_id, wrapped = other.wrap(dek, CTX)
    assert ring.unwrap(kek_id, wrapped, CTX) == dek
    assert ring.wrap(dek, CTX)[0] == new_id  # new objects use the new active KEK


def test_concurrent_rotations_keep_all_keys(ring: Keyring, path: Path) -> None:
    other = Keyring.load(path)
    first = ring.rotate()
    second = other.rotate()  # other's in-memory copy is stale; rotate re-reads the file first
    assert set(Keyring.load(path).ids()) == {*ring.ids(), first, second}
    assert Keyring.load(path).active_id == second


def test_removed_kek_makes_its_keys_unreadable(ring: Keyring, path: Path) -> None:
    """Deleting a KEK from the file is crypto-erasure of every DEK still wrapped by it."""
    old_id, wrapped = ring.wrap(new_data_key(), CTX)
    ring.rotate()
    doc = read_doc(path)
    del doc["keys"][old_id]
    write_doc(path, doc)
    with pytest.raises(KeyringError, match="unknown"):
        Keyring.load(path).unwrap(old_id, wrapped, CTX)
    with pytest.raises(KeyringError, match="unknown"):
        ring.unwrap(old_id, wrapped, CTX)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="does not exist"):
        Keyring.load(tmp_path / "absent.json")


def test_rotate_when_directory_is_gone(ring: Keyring, path: Path) -> None:
    path.unlink()
    path.parent.rmdir()
    with pytest.raises(KeyringError, match="cannot write keyring file"):
        ring.rotate()


def _valid_doc() -> dict[str, Any]:
    key = base64.b64encode(bytes(range(32))).decode()
    return {"version": 1, "active": "kek-a", "keys": {"kek-a": key}}


def _with(**changes: Any) -> dict[str, Any]:
    doc = _valid_doc()
    doc.update(changes)
    return doc


SECRET_B64 = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe" + SECRET_B64.encode(), "not valid UTF-8 JSON"),
        (b"[]", "must hold a JSON object"),
        (json.dumps(_with(version=2)).encode(), "unsupported version"),
        (
            json.dumps({k: v for k, v in _valid_doc().items() if k != "version"}).encode(),
            "unsupported version",
        ),
        (json.dumps(_with(keys={})).encode(), "no keys"),
        (json.dumps(_with(keys=[SECRET_B64])).encode(), "no keys"),
        (json.dumps(_with(active="kek-b")).encode(), "active key id"),
        (json.dumps(_with(active=None)).encode(), "active key id"),
        (json.dumps(_with(keys={"kek-a": SECRET_B64[:-8] + "===="})).encode(), "not base64 of 32 bytes"),
        (json.dumps(_with(keys={"kek-a": base64.b64encode(b"x" * 16).decode()})).encode(), "32 bytes"),
        (json.dumps(_with(keys={"kek-a": base64.b64encode(b"x" * 33).decode()})).encode(), "32 bytes"),
        (json.dumps(_with(keys={"kek-a": SECRET_B64 + "!"})).encode(), "32 bytes"),
        (json.dumps(_with(keys={"kek-a": 5})).encode(), "32 bytes"),
        (json.dumps(_with(keys={"bad id!": SECRET_B64}, active="bad id!")).encode(), "invalid key id"),
        (json.dumps(_with(extra=1)).encode(), "unknown fields: extra"),
    ],
)
def test_corrupt_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content)
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.load(path)
    assert SECRET_B64 not in str(info.value)
    assert SECRET_B64[:12] not in str(info.value)


def test_valid_handwritten_file_loads(tmp_path: Path) -> None:
    """An operator-made Secret with its own ids is accepted."""
    path = tmp_path / "keyring.json"
    write_doc(path, _valid_doc())
    ring = Keyring.load(path)
    assert ring.active_id == "kek-a"
    dek = new_data_key()
    assert ring.unwrap(*ring.wrap(dek, CTX), CTX) == dek


def test_reload_of_corrupted_file_fails_loudly(ring: Keyring, path: Path) -> None:
    path.write_text("{}")
    with pytest.raises(KeyringError, match="unsupported version"):
        ring.wrap(new_data_key(), CTX)


def test_repr_has_no_key_material(ring: Keyring, path: Path) -> None:
    secret = read_doc(path)["keys"][ring.active_id]
    assert secret not in repr(ring)
    assert ring.active_id in repr(ring)
