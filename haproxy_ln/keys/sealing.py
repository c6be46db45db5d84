"""Sealed secret files: authenticated encryption at rest under a key-encryption key (KEK).

How this works: a secret (hsm_secret, an eclair seed, lnd's wallet password)
is stored on both nodes only sealed, with AES-256-GCM from `cryptography`
under a 32-byte KEK that lives elsewhere (a root-only file, or a systemd
credential, which systemd can keep encrypted with the TPM or the host key).
A sealed file is

    magic "HLNSEAL\\0" | version (1 byte) | KEK id (8) | role length (1) | role | nonce (12)
    | ciphertext + GCM tag (16)

and everything before the nonce is the associated data, so the role (the
name the secret is materialized as, e.g. "hsm_secret") and the KEK id are
authenticated: a sealed wallet password cannot be passed off as an
hsm_secret, and a file sealed under another KEK is reported as such rather
than as "corrupt". The KEK id is the first 8 bytes of a domain-separated
SHA-256 of the KEK; it tells KEKs apart and reveals nothing else.

Plaintexts only ever live in `Secret`, whose repr and str are redacted, and
no error raised here carries secret bytes or KEK bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from haproxy_ln.errors import KeyCustodyError, SealedFileError

__all__ = [
    "KEK_SIZE",
    "MAGIC",
    "MAX_SECRET_SIZE",
    "ROLE_PATTERN",
    "VERSION",
    "Kek",
    "KekSource",
    "Secret",
    "check_role",
    "open_sealed",
    "read_sealed",
    "seal",
    "unseal",
]

MAGIC = b"HLNSEAL\0"
VERSION = 1
KEK_SIZE = 32
KEK_ID_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_SECRET_SIZE = 1024 * 1024  # secrets are bytes to a few KiB; a cap keeps a wrong path cheap
ROLE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$"  # a plain file name: no "/", no ".."
_HEADER_FIXED = len(MAGIC) + 1 + KEK_ID_SIZE + 1
_MAX_SEALED_SIZE = _HEADER_FIXED + 255 + NONCE_SIZE + MAX_SECRET_SIZE + TAG_SIZE
_KEK_ID_DOMAIN = b"haproxy-ln KEK id v1\0"


class Secret:
    """Secret bytes that never show themselves in a repr, str, log line or traceback.

    Python cannot promise to wipe memory; keep a Secret only as long as needed.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The secret bytes: pass them on, never format or log them."""
        return self._value

    def same_as(self, other: bytes) -> bool:
        """Whether `other` holds the same bytes, compared in constant time."""
        return hmac.compare_digest(self._value, other)

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret(<redacted>, {len(self._value)} bytes)"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")


class Kek:
    """A key-encryption key: 32 bytes, shown only by its id."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_SIZE:
            raise ValueError(f"a KEK is {KEK_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)
        self.key_id = hashlib.sha256(_KEK_ID_DOMAIN + self._key).digest()[:KEK_ID_SIZE]

    @classmethod
    def generate(cls) -> Kek:
        return cls(secrets.token_bytes(KEK_SIZE))

    @classmethod
    def parse(cls, data: bytes, source: str) -> Kek:
        """A KEK from a file's bytes: 32 raw bytes, or 64 hex digits (optionally with a newline).

        Raises KeyCustodyError naming `source` and the length found, never the bytes.
        """
        if len(data) == KEK_SIZE:
            return cls(data)
        text = data.strip()
        if len(text) == 2 * KEK_SIZE and re.fullmatch(rb"[0-9a-fA-F]+", text):
            return cls(bytes.fromhex(text.decode()))
        raise KeyCustodyError(
            f"{source}: not a KEK: expected {KEK_SIZE} raw bytes or {2 * KEK_SIZE} hex digits, "
            f"found {len(data)} bytes (make one with `haproxy-ln keys new-kek FILE`)"
        )

    def to_text(self) -> bytes:
        """The KEK as written by `haproxy-ln keys new-kek`: hex digits and a newline."""
        return self._key.hex().encode() + b"\n"

    def aead(self) -> AESGCM:
        return AESGCM(self._key)

    def __repr__(self) -> str:
        return f"Kek(id={self.key_id.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a Kek cannot be pickled")


@dataclass(frozen=True, slots=True)
class KekSource:
    """Where the KEK comes from: a file, or a systemd credential by name (exactly one)."""

    file: Path | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.credential is None):
            raise ValueError("give exactly one of a KEK file and a KEK credential")

    def describe(self) -> str:
        if self.file is not None:
            return f"KEK file {self.file}"
        return f"KEK credential {self.credential!r}"

    def load(self) -> Kek:
        """Read the KEK now.

        Raises KeyCustodyError when it is missing, unreadable, readable by
        group or others (a file), or not a KEK.
        """
        if self.file is not None:
            path = self.file
        else:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise KeyCustodyError(
                    f"{self.describe()}: $CREDENTIALS_DIRECTORY is not set; give the unit "
                    f"LoadCredential={self.credential}:... or LoadCredentialEncrypted="
                )
            path = Path(directory) / str(self.credential)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise KeyCustodyError(f"{self.describe()}: cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyCustodyError(f"{self.describe()}: {path} is not a regular file")
            if self.file is not None and st.st_mode & 0o077:
                raise KeyCustodyError(
                    f"{self.describe()}: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                    f"others use it; run chmod 0400 {path}"
                )
            data = os.read(fd, 4 * KEK_SIZE + 1)
        finally:
            os.close(fd)
        return Kek.parse(data, self.describe())


def check_role(role: str) -> str:
    """`role` if it is a plain file name of at most 255 bytes; raises ValueError otherwise."""
    if not re.fullmatch(ROLE_PATTERN, role) or len(role.encode()) > 255:
        raise ValueError(
            f"role {role!r} is not a plain file name (letters, digits, '.', '_', '-'; "
            "no '/'; 1 to 255 characters, not starting with '.' or '-')"
        )
    return role


def _header(kek_id: bytes, role: str) -> bytes:
    encoded = check_role(role).encode()
    return MAGIC + bytes([VERSION]) + kek_id + bytes([len(encoded)]) + encoded


def seal(secret: bytes, kek: Kek, role: str) -> bytes:
    """The sealed-file bytes for `secret` under `kek`, bound to `role`.

    Raises ValueError for a bad role or a secret over MAX_SECRET_SIZE.
    """
    if len(secret) > MAX_SECRET_SIZE:
        raise ValueError(f"a secret is at most {MAX_SECRET_SIZE} bytes, this is {len(secret)}")
    header = _header(kek.key_id, role)
    nonce = secrets.token_bytes(NONCE_SIZE)  # random 96-bit nonces: fine for a handful of seals
    return header + nonce + kek.aead().encrypt(nonce, secret, header)


def unseal(data: bytes, kek: Kek, role: str, name: str) -> Secret:
    """Open the sealed-file bytes `data` (from the file `name`) expecting `role`.

    Raises SealedFileError naming `name` and what is wrong: not a sealed
    file, an unknown version, truncated, another KEK, another role, or
    altered. The message never contains secret bytes.
    """
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SealedFileError(name, "not a haproxy-ln sealed file (wrong magic bytes)")
    if len(data) < _HEADER_FIXED:
        raise SealedFileError(name, "truncated: the header is incomplete")
    version = data[len(MAGIC)]
    if version != VERSION:
        raise SealedFileError(
            name, f"sealed-file version {version} is not supported (this reads version {VERSION})"
        )
    kek_id = data[len(MAGIC) + 1 : len(MAGIC) + 1 + KEK_ID_SIZE]
    role_length = data[_HEADER_FIXED - 1]
    role_end = _HEADER_FIXED + role_length
    if len(data) < role_end + NONCE_SIZE + TAG_SIZE:
        raise SealedFileError(name, "truncated: shorter than its header, nonce and tag")
    header, nonce = data[:role_end], data[role_end : role_end + NONCE_SIZE]
    if not hmac.compare_digest(kek_id, kek.key_id):
        raise SealedFileError(
            name,
            f"sealed under another KEK (key id {kek_id.hex()}; this KEK's id is "
            f"{kek.key_id.hex()})",
        )
    try:
        sealed_role = data[_HEADER_FIXED:role_end].decode()
    except UnicodeDecodeError:
        sealed_role = ""
    if sealed_role != role:
        raise SealedFileError(
            name,
            f"sealed for role {sealed_role!r} but configured as {role!r}; seal the secret "
            f"again with `haproxy-ln keys seal --role {role}`",
        )
    try:
        plaintext = kek.aead().decrypt(nonce, data[role_end + NONCE_SIZE :], header)
    except InvalidTag:
        raise SealedFileError(
            name, "authentication failed: the file was altered, truncated or corrupted"
        ) from None
    return Secret(plaintext)


def read_sealed(path: Path) -> bytes:
    """The bytes of the sealed file at `path` (not followed if a symlink).

    Raises SealedFileError when it cannot be read or is too large to be sealed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SealedFileError(str(path), f"cannot open: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SealedFileError(str(path), "not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > _MAX_SEALED_SIZE:
                raise SealedFileError(str(path), "too large to be a sealed secret")
            chunks.append(chunk)
    except OSError as e:
        raise SealedFileError(str(path), f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def open_sealed(path: Path, kek: Kek, role: str) -> Secret:
    """Read and open the sealed file at `path`; raises SealedFileError (see `unseal`)."""
    return unseal(read_sealed(path), kek, role, str(path))
