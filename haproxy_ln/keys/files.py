"""Secret files on disk: private directories, atomic writes, overwrite-then-unlink.

How this works: a secret is written to a temporary name beside its target,
created with O_EXCL and O_NOFOLLOW and given its final mode (and owner)
before the first byte, then fsynced and renamed over the target, and the
directory is fsynced, so a reader sees either no file or the whole secret.
Removal overwrites the file with zeros, fsyncs, unlinks and fsyncs the
directory. On tmpfs (the runtime directory under systemd) that overwrites
the very pages that held the secret; on journaling or copy-on-write
filesystems the old blocks may survive, which is why the runtime directory
should be a tmpfs (docs/keys.md).

These are blocking calls: the custody runs them in a worker thread.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from haproxy_ln.errors import KeyCustodyError

__all__ = [
    "Owner",
    "check_target_dir",
    "ensure_private_dir",
    "read_small",
    "shred",
    "temp_name",
    "write_secret",
]

_ZEROS = bytes(65536)


@dataclass(frozen=True, slots=True)
class Owner:
    """The user and group that materialized files (and the runtime directory) belong to."""

    uid: int
    gid: int

    @classmethod
    def parse(cls, text: str) -> Owner:
        """`user` or `user:group` (names or numbers) as ids on this machine.

        Raises KeyCustodyError when the user or group does not exist here.
        """
        user, _, group = text.partition(":")
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise KeyCustodyError(f"keys.owner: no user {user!r} on this machine") from None
        gid = entry.pw_gid
        if group:
            try:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            except KeyError:
                raise KeyCustodyError(f"keys.owner: no group {group!r} on this machine") from None
        return cls(entry.pw_uid, gid)


def temp_name(target: Path) -> Path:
    """The temporary file a write of `target` goes through (a leftover after a kill -9)."""
    return target.with_name(f".{target.name}.haproxy-ln-tmp")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path, owner: Owner | None) -> None:
    """Create the directory `path` with mode 0700 if missing, and check it is private.

    Raises KeyCustodyError if it is not a directory (or is a symlink), is not
    owned by us (or `owner`), or group or others can access it.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise KeyCustodyError(f"runtime directory {path} is not a directory")
        if owner is not None and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
            st = path.lstat()
    except OSError as e:
        raise KeyCustodyError(f"runtime directory {path}: {e.strerror}") from None
    expected_uid = owner.uid if owner is not None else os.geteuid()
    if st.st_uid != expected_uid:
        raise KeyCustodyError(
            f"runtime directory {path} belongs to uid {st.st_uid}, not {expected_uid}"
        )
    if st.st_mode & 0o077:
        raise KeyCustodyError(
            f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
            f"others can reach the keys in it; run chmod 0700 {path}"
        )


def check_target_dir(path: Path) -> None:
    """Check that the existing directory `path` can hold a secret file safely.

    Raises KeyCustodyError if it is missing, not a directory, or writable by
    group or others (who could then replace or remove the secret).
    """
    try:
        st = path.stat()
    except OSError as e:
        raise KeyCustodyError(f"key directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyCustodyError(f"key directory {path} is not a directory")
    if st.st_mode & 0o022:
        raise KeyCustodyError(
            f"key directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
            f"can replace files in it; run chmod go-w {path}"
        )


def read_small(path: Path, limit: int) -> bytes | None:
    """The content of the regular file `path`, or None if there is no such file.

    Raises KeyCustodyError if `path` is a symlink or not a regular file, is
    larger than `limit` bytes, or cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeyCustodyError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyCustodyError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise KeyCustodyError(f"{path} is larger than any secret haproxy-ln writes")
        return os.read(fd, limit + 1)
    except OSError as e:
        raise KeyCustodyError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def write_secret(target: Path, data: bytes, mode: int, owner: Owner | None) -> None:
    """Write `data` to `target` atomically, with `mode` and `owner` set before any byte.

    Replaces an existing `target`. Raises KeyCustodyError (naming the path,
    never the data) when it cannot; the temporary file is removed then.
    """
    temp = temp_name(target)
    shred(temp)  # a leftover of a killed write
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600 & mode
        )
    except OSError as e:
        raise KeyCustodyError(f"cannot create {temp}: {e.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(temp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        shred(temp)
        raise KeyCustodyError(f"cannot write {target}: {e.strerror}") from None


def shred(path: Path) -> bool:
    """Overwrite the file at `path` with zeros, fsync it, unlink it, fsync its directory.

    A symlink is unlinked without touching what it points to. Returns
    whether anything was there. Raises KeyCustodyError when the file exists
    and cannot be removed.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise KeyCustodyError(f"cannot remove {path}: {e.strerror}") from None
    try:
        if stat.S_ISREG(st.st_mode):
            # Our files are 0400: a non-root owner must make it writable to overwrite it.
            os.chmod(path, 0o200, follow_symlinks=False)
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                left = st.st_size
                while left > 0:
                    left -= os.write(fd, _ZEROS[: min(left, len(_ZEROS))])
                os.fsync(fd)
            finally:
                os.close(fd)
        os.unlink(path)
        _fsync_dir(path.parent)
    except FileNotFoundError:
        return True  # removed by someone else meanwhile: gone is what we want
    except OSError as e:
        raise KeyCustodyError(f"cannot remove {path}: {e.strerror}") from None
    return True
