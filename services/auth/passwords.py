"""Password hashing (argon2id) and the password policy (NIST SP 800-63B, section 3.1.1.2).

The policy checks length (after Unicode NFKC normalization; spaces and every printable character are
allowed), refuses common/breached passwords (the packaged 20,000-entry list, see data/NOTICE.txt),
passwords made of the account's own names, and trivial repetitions or sequences. It has no composition
rules unless a site sets ``password_min_classes``.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import secrets
import string
import unicodedata
from collections.abc import Iterable
from importlib import resources

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pacslib.errors import BadRequestError
from services.auth.settings import AuthSettings

_ONE_TIME_ALPHABET = "abcdefghijkmnpqrstuvwxyzACDEFGHJKLMNPQRTUVWXY345679"  # no look-alikes
_SEQUENCES = (string.ascii_lowercase, string.digits, "qwertyuiopasdfghjklzxcvbnm", "qwertzuiop")


@functools.cache
def common_passwords() -> frozenset[str]:
    """The packaged list of common passwords, lower case."""
    data = resources.files("services.auth").joinpath("data/common-passwords.txt.gz").read_bytes()
    return frozenset(
        line.strip() for line in gzip.decompress(data).decode("utf-8").splitlines() if line.strip()
    )


def normalize(password: str) -> str:
    """NFKC-normalize a password so that the same characters typed differently hash the same."""
    return unicodedata.normalize("NFKC", password)


class PasswordHasher:
    """argon2id hashing with configurable cost; runs in a worker thread to keep the event loop free.

    Each computation holds ``memory_kib`` of memory while it runs, so at most ``max_concurrent`` run at
    once and the rest wait their turn: a burst of sign-ins (or of wrong guesses from many addresses)
    costs time, never an unbounded amount of memory.
    """

    def __init__(self, time_cost: int, memory_kib: int, parallelism: int, max_concurrent: int = 2) -> None:
        self._hasher = Argon2Hasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._slots = asyncio.Semaphore(max_concurrent)
        # Verified against when the user does not exist, so both cases take the same time.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> PasswordHasher:
        return cls(
            settings.argon2_time_cost,
            settings.argon2_memory_kib,
            settings.argon2_parallelism,
            settings.argon2_max_concurrent,
        )

    async def hash(self, password: str) -> str:
        """The argon2id hash (PHC string, salt included) of a password."""
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, normalize(password))

    async def verify(self, stored: str | None, password: str) -> bool:
        """Whether ``password`` matches ``stored``; with ``stored=None`` a dummy hash is checked instead."""
        target = stored or self._dummy

        def check() -> bool:
            try:
                return bool(self._hasher.verify(target, normalize(password)))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        async with self._slots:
            ok = await asyncio.to_thread(check)
        return ok and stored is not None

    def needs_rehash(self, stored: str) -> bool:
        """Whether a stored hash was made with other parameters than the current ones."""
        try:
            return bool(self._hasher.check_needs_rehash(stored))
        except InvalidHashError:
            return True


def _classes(password: str) -> int:
    kinds = [
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]
    return sum(kinds)


def _trivial(lowered: str) -> bool:
    if len(set(lowered)) <= 2:
        return True
    return any(lowered in seq or lowered in seq[::-1] for seq in _SEQUENCES)


class PasswordPolicy:
    """Decides whether a new password is acceptable; raises BadRequestError saying why not."""

    def __init__(self, min_length: int, max_length: int, min_classes: int) -> None:
        self.min_length = min_length
        self.max_length = max_length
        self.min_classes = min_classes

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> PasswordPolicy:
        return cls(settings.password_min_length, settings.password_max_length, settings.password_min_classes)

    def check(self, password: str, context: Iterable[str] = ()) -> None:
        """Raise BadRequestError unless ``password`` satisfies the policy.

        ``context``: words specific to the account (username, display name, organization) that must
        not make up the password.
        """
        value = normalize(password)
        if len(value) < self.min_length:
            raise BadRequestError(f"the password must have at least {self.min_length} characters")
        if len(value) > self.max_length:
            raise BadRequestError(f"the password must have at most {self.max_length} characters")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise BadRequestError("the password must not contain control characters")
        lowered = value.casefold()
        squeezed = "".join(lowered.split())
        if lowered in common_passwords() or squeezed in common_passwords():
            raise BadRequestError("this password is too common (it appears in lists of breached passwords)")
        if _trivial(squeezed):
            raise BadRequestError("the password must not be a repetition or a simple sequence of characters")
        for word in context:
            word_key = "".join(normalize(word).casefold().split())
            if len(word_key) >= 4 and (word_key in squeezed and len(squeezed) - len(word_key) < 6):
                raise BadRequestError("the password must not be based on the account or organization name")
        if "cloudpacs" in squeezed and len(squeezed) < 15:
            raise BadRequestError("the password must not be based on the name of this service")
        if self.min_classes and _classes(value) < self.min_classes:
            raise BadRequestError(
                f"this site requires passwords mixing at least {self.min_classes} of: lower case, "
                "upper case, digits, other characters"
            )


def one_time_password(length: int = 20) -> str:
    """A random one-time password (about 113 bits for 20 characters) for bootstrap and admin resets."""
    return "".join(secrets.choice(_ONE_TIME_ALPHABET) for _ in range(length))
