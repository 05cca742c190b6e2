"""The bootstrap command, the password policy, argon2id hashing, TOTP/recovery codes, sealing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pacslib.envelope import IntegrityError
from pacslib.errors import BadRequestError
from pacslib.keyring import Keyring
from services.auth import mfa
from services.auth.passwords import PasswordHasher, PasswordPolicy, common_passwords
from services.auth.sealing import seal, unseal
from services.auth.settings import AuthSettings

REPO = Path(__file__).resolve().parents[2]


def run_bootstrap(state: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PACS_AUTH_STATE_DIR": str(state),
        "PACS_AUTH_ARGON2_TIME_COST": "1",
        "PACS_AUTH_ARGON2_MEMORY_KIB": "8",
        "PACS_AUTH_ARGON2_PARALLELISM": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.auth.bootstrap", "--username", "root"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bootstrap_prints_a_one_time_password_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_bootstrap(state)
    assert first.returncode == 0, first.stderr
    line = next(x for x in first.stdout.splitlines() if "one-time password:" in x)
    password = line.split(":", 1)[1].strip()
    assert len(password) == 20
    assert "username:           root" in first.stdout
    second = run_bootstrap(state)
    assert second.returncode == 0
    assert "already exists; nothing was changed" in second.stdout
    assert password not in second.stdout
    assert oct((state / "auth.db").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "keyring.json").stat().st_mode & 0o777) == "0o600"
    assert password.encode() not in (state / "auth.db").read_bytes()


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short", "at least 12"),
        ("password1234", "too common"),
        ("Q1W2E3R4T5Y6", "too common"),
        ("aaaaaaaaaaaaaaa", "repetition"),
        ("abcdefghijklmnop", "sequence"),
        ("qwertyuiopasdf", "sequence"),
        ("rita.radiology!", "account"),
        ("x" * 129, "at most 128"),
        ("tab\tinside password", "control"),
    ],
)
def test_policy_refuses_weak_passwords(password: str, reason: str) -> None:
    with pytest.raises(BadRequestError, match=reason):
        PasswordPolicy(12, 128, 0).check(password, ["rita.radiology", "Rita"])


def test_policy_accepts_passphrases_without_composition_rules() -> None:
    policy = PasswordPolicy(12, 128, 0)
    for good in (
        "correct horse battery staple",
        "ein sehr langes Passwort",
        "日本語のパスワードです長い",
        "      spaced out words    ",
    ):
        policy.check(good)
    strict = PasswordPolicy(12, 128, 3)
    with pytest.raises(BadRequestError, match="at least 3"):
        strict.check("correct horse battery staple")
    strict.check("Correct horse battery 9")
    assert len(common_passwords()) > 19000


async def test_argon2id_hash_verify_and_rehash() -> None:
    hasher = PasswordHasher(1, 8, 1)
    stored = await hasher.hash("ｐａｓｓ phrase")  # full-width: NFKC-normalized
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert await hasher.verify(stored, "pass phrase")
    assert not await hasher.verify(stored, "pass phrasE")
    assert not await hasher.verify(None, "anything")  # unknown user: a dummy hash is checked, never true
    assert not await hasher.verify("not a hash", "x")
    assert PasswordHasher(2, 16, 1).needs_rehash(stored)
    assert not hasher.needs_rehash(stored)
    defaults = AuthSettings()
    assert (defaults.argon2_time_cost, defaults.argon2_memory_kib, defaults.argon2_parallelism) == (
        3,
        65536,
        4,
    )
    assert defaults.argon2_max_concurrent == 2


@pytest.mark.parametrize("limit", [1, 3])
async def test_argon2_computations_at_once_are_bounded(limit: int) -> None:
    """A burst of sign-ins queues for the hasher: its memory is bounded by the limit, not by the burst."""
    hasher = PasswordHasher(2, 256, 1, max_concurrent=limit)
    stored = await hasher.hash("a long enough pass phrase")
    real = hasher._hasher
    running = 0
    most = 0
    lock = threading.Lock()

    class CountingHasher:
        """The real argon2 hasher, counting how many of its computations overlap."""

        def verify(self, target: str, password: str) -> bool:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                time.sleep(0.02)  # long enough for every waiting request to try to start
                return bool(real.verify(target, password))
            finally:
                with lock:
                    running -= 1

    hasher._hasher = CountingHasher()  # type: ignore[assignment]
    results = await asyncio.gather(
        *(hasher.verify(stored, "a long enough pass phrase" if i % 2 else "wrong") for i in range(12))
    )
    assert results == [bool(i % 2) for i in range(12)]
    assert most == limit


def test_totp_window_and_replay() -> None:
    secret = mfa.new_secret()
    now = 1_800_000_000.0
    step = mfa.current_step(now)
    assert mfa.verify_totp(secret, mfa.code_at(secret, step), now, window=1, last_step=-1) == step
    assert mfa.verify_totp(secret, mfa.code_at(secret, step - 1), now, window=1, last_step=-1) == step - 1
    assert mfa.verify_totp(secret, mfa.code_at(secret, step - 2), now, window=1, last_step=-1) is None
    assert mfa.verify_totp(secret, mfa.code_at(secret, step), now, window=1, last_step=step) is None  # replay
    assert mfa.verify_totp(secret, "12345", now, window=1, last_step=-1) is None
    uri = mfa.provisioning_uri(secret, "rita", "cloudpacs")
    assert uri.startswith("otpauth://totp/cloudpacs:rita?secret=")


def test_recovery_codes_are_random_and_hashed() -> None:
    codes = mfa.new_recovery_codes()
    assert len(set(codes)) == 10
    assert all(len(c) == 19 and mfa.looks_like_recovery_code(c) for c in codes)
    assert mfa.hash_recovery_code(codes[0]) == mfa.hash_recovery_code(codes[0].upper().replace("-", " "))
    assert codes[0] not in mfa.hash_recovery_code(codes[0])


def test_sealed_secrets_are_bound_to_purpose_and_record(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keyring.json")
    sealed = seal(keyring, "totp", "user-1", b"JBSWY3DPEHPK3PXP")
    assert unseal(keyring, "totp", "user-1", sealed) == b"JBSWY3DPEHPK3PXP"
    assert b"JBSWY3DPEHPK3PXP" not in str(sealed).encode()
    with pytest.raises(IntegrityError):
        unseal(keyring, "totp", "user-2", sealed)
    with pytest.raises(IntegrityError):
        unseal(keyring, "signing-key", "user-1", sealed)
    keyring.rotate()
    assert unseal(keyring, "totp", "user-1", sealed) == b"JBSWY3DPEHPK3PXP"  # old KEK still opens it
    assert seal(keyring, "totp", "user-1", b"x")["kek_id"] == keyring.active_id
