"""What `haproxy-ln keys new-kek` and `haproxy-ln keys seal` do, for operators deploying keys.

Both create their output with O_EXCL, so they never overwrite a file (an
overwritten KEK would make every file sealed under it unreadable), and set
the final mode before writing the first byte.
"""

from __future__ import annotations

import os
from pathlib import Path

from haproxy_ln.errors import KeyCustodyError
from haproxy_ln.keys.files import read_small
from haproxy_ln.keys.sealing import MAX_SECRET_SIZE, Kek, KekSource, check_role, seal

__all__ = ["new_kek", "seal_file"]


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to the new file `path`; raises KeyCustodyError if it exists or fails."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except FileExistsError:
        raise KeyCustodyError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise KeyCustodyError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise KeyCustodyError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)


def new_kek(path: Path) -> Kek:
    """Generate a KEK into the new file `path` (mode 0400, 64 hex digits).

    Raises KeyCustodyError if `path` exists or cannot be written.
    """
    kek = Kek.generate()
    _create(path, kek.to_text(), 0o400)
    return kek


def seal_file(kek_file: Path, source: Path, output: Path, role: str | None = None) -> str:
    """Seal the secret in `source` into the new file `output` under the KEK in `kek_file`.

    The role defaults to the name of `source`; returns the role used.
    Raises KeyCustodyError if the KEK or the source cannot be read, the role
    is not a plain file name, or `output` exists.
    """
    role = role or source.name
    try:
        check_role(role)
    except ValueError as e:
        raise KeyCustodyError(f"{e}; give one with --role") from None
    kek = KekSource(file=kek_file).load()
    secret = read_small(source, MAX_SECRET_SIZE)
    if secret is None:
        raise KeyCustodyError(f"{source}: no such file")
    _create(output, seal(secret, kek, role), 0o400)
    return role
