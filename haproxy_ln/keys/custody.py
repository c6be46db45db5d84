"""Key custody: the node's secrets exist in usable form only while it is active.

How this works: the HA shell decides when (DESIGN section 5, invariant 1);
a custody only does what it is told and records it in the safety event log.

- `materialize()` opens every sealed file with the KEK, then emits
  "keys.materialized" and writes the secrets to their targets (atomically,
  final mode before the first byte). The event comes first so that the
  interval a checker sees always covers the time the files exist.
- `unlock()` does nothing for file adapters; lnd's custody unlocks there.
- `destroy()` overwrites and unlinks every target, then emits
  "keys.destroyed": only once the files are really gone. It finishes even
  when the caller is cancelled, and does nothing when nothing is held.
- `cleanup_at_start()` runs once when the agent starts: it checks every
  sealed file opens (so a wrong KEK shows at start, not at failover), and
  removes what a killed agent left behind. A target that exists but is
  not the sealed secret is refused, never deleted: it may be the operator's
  only copy of a key.

Adapters "cln", "eclair" and "command" are one `FileCustody` with different
file lists; "lnd" is `LndCustody` (lnd.py); "none" holds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from haproxy_ln.config import KeysConfig
from haproxy_ln.errors import KeyCustodyError
from haproxy_ln.events import EventLog
from haproxy_ln.keys.files import (
    Owner,
    check_target_dir,
    ensure_private_dir,
    read_small,
    shred,
    temp_name,
    write_secret,
)
from haproxy_ln.keys.lnd import LndCustody, LndSettings
from haproxy_ln.keys.sealing import MAX_SECRET_SIZE, KekSource, Secret, check_role, open_sealed

__all__ = [
    "FileCustody",
    "KeyCustody",
    "NoCustody",
    "SecretFile",
    "custody_from_config",
]

log = logging.getLogger(__name__)

SECRET_MODE = 0o400


class KeyCustody(Protocol):
    """What the HA shell and the daemon supervisor use; see the module docstring."""

    adapter: str

    @property
    def held(self) -> bool:
        """Whether secrets may exist in usable form on this node because of us."""
        ...

    async def materialize(self) -> None:
        """Make the secrets available before the daemon starts; raises KeyCustodyError."""
        ...

    async def unlock(self) -> None:
        """After the daemon started: hand it what it needs at run time (lnd's password)."""
        ...

    async def destroy(self) -> None:
        """Remove the secrets, then record it; raises KeyCustodyError if they may remain."""
        ...

    def cleanup_at_start(self) -> None:
        """Check the sealed files open and remove a killed agent's leftovers."""
        ...


class NoCustody:
    """Adapter "none": haproxy-ln holds no keys (the daemon manages its own)."""

    adapter = "none"
    held = False

    async def materialize(self) -> None:
        pass

    async def unlock(self) -> None:
        pass

    async def destroy(self) -> None:
        pass

    def cleanup_at_start(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NoCustody()"


@dataclass(frozen=True, slots=True)
class SecretFile:
    """One secret: its sealed file, the role it was sealed for, and where it is written."""

    sealed: Path
    target: Path
    role: str


class FileCustody:
    """Secrets as files: the "cln", "eclair" and "command" adapters."""

    def __init__(
        self,
        adapter: str,
        files: Sequence[SecretFile],
        kek: KekSource,
        events: EventLog,
        runtime_dir: Path,
        owner: Owner | None = None,
    ) -> None:
        """Raises KeyCustodyError if a target would overwrite a sealed file or another target."""
        targets = [f.target for f in files]
        if len(set(targets)) != len(targets):
            raise KeyCustodyError("two secret files have the same target")
        for f in files:
            check_role(f.role)
            if f.target in {s.sealed for s in files}:
                raise KeyCustodyError(f"{f.target} is both a sealed file and a target")
        self.adapter = adapter
        self._files = tuple(files)
        self._kek = kek
        self._events = events
        self._runtime_dir = runtime_dir
        self._owner = owner
        self._held = False
        self._lock = trio.Lock()

    @property
    def held(self) -> bool:
        """Whether the secret files may exist (from just before the first write)."""
        return self._held

    @property
    def targets(self) -> tuple[Path, ...]:
        return tuple(f.target for f in self._files)

    def __repr__(self) -> str:
        return f"FileCustody(adapter={self.adapter!r}, files={len(self._files)}, held={self._held})"

    def _open_all(self) -> list[Secret]:
        kek = self._kek.load()
        return [open_sealed(f.sealed, kek, f.role) for f in self._files]

    def _prepare_dirs(self) -> None:
        ensure_private_dir(self._runtime_dir, self._owner)
        for directory in {f.target.parent for f in self._files}:
            if directory != self._runtime_dir:
                check_target_dir(directory)

    def _refuse_foreign(self, secrets: list[Secret]) -> list[Path]:
        """Targets that already hold their secret (leftovers); raises for any other content."""
        leftovers = []
        for f, secret in zip(self._files, secrets, strict=True):
            content = read_small(f.target, MAX_SECRET_SIZE)
            if content is None:
                continue
            if not secret.same_as(content):
                raise KeyCustodyError(
                    f"{f.target} exists and is not the secret sealed in {f.sealed}; haproxy-ln "
                    "will not overwrite or delete it: seal it if it is the node's key, then "
                    "move it away"
                )
            leftovers.append(f.target)
        return leftovers

    def _remove_all(self) -> list[Path]:
        """Overwrite and unlink every target and temporary file; returns those that existed."""
        return [
            path for f in self._files for path in (temp_name(f.target), f.target) if shred(path)
        ]

    def _emit(self, kind: str, **fields: str | bool) -> None:
        self._events.emit(kind, adapter=self.adapter, files=len(self._files), **fields)

    def _write_all(self, secrets: list[Secret]) -> None:
        for f, secret in zip(self._files, secrets, strict=True):
            write_secret(f.target, secret.reveal(), SECRET_MODE, self._owner)

    def _materialize_sync(self) -> None:
        secrets = self._open_all()  # any bad sealed file fails here, before anything is held
        self._prepare_dirs()
        if self._held:  # e.g. after a destroy() that failed half-way: make the files whole
            self._write_all(secrets)
            return
        self._refuse_foreign(secrets)
        self._emit("keys.materialized")
        self._held = True
        try:
            self._write_all(secrets)
        except BaseException:
            self._remove_all()  # if this raises, held stays true and destroy() tries again
            self._emit("keys.destroyed", reason="materialize failed")
            self._held = False
            raise

    async def materialize(self) -> None:
        """Write every secret to its target (again, if already held: no new event).

        Raises KeyCustodyError (SealedFileError for a sealed file that does not
        open) naming the file; then nothing is held.
        """
        async with self._lock:
            # Not abandoned on cancel: the files are whole, or removed again, when it returns.
            await trio.to_thread.run_sync(self._materialize_sync)

    async def unlock(self) -> None:
        """Nothing to do: the daemon reads its files itself."""

    def _destroy_sync(self) -> None:
        removed = self._remove_all()
        if self._held or removed:
            self._emit("keys.destroyed")
            self._held = False

    async def destroy(self) -> None:
        """Overwrite and unlink every target, then emit "keys.destroyed".

        Runs to the end even if the caller is cancelled. Raises
        KeyCustodyError when a file cannot be removed; `held` stays true then.
        """
        with trio.CancelScope(shield=True):
            async with self._lock:
                await trio.to_thread.run_sync(self._destroy_sync)

    def cleanup_at_start(self) -> None:
        """Check every sealed file opens; remove leftovers of a killed agent.

        Emits "keys.destroyed" (leftover=True) when it removed any. Raises
        KeyCustodyError for a sealed file that does not open, or a target
        holding something else than its secret.
        """
        secrets = self._open_all()
        self._refuse_foreign(secrets)
        removed = self._remove_all()
        if removed:
            log.warning("removed secrets left by an earlier run: %s", ", ".join(map(str, removed)))
            self._emit("keys.destroyed", leftover=True)


def _file_list(cfg: KeysConfig) -> list[SecretFile]:
    base = Path(cfg.target_dir or cfg.runtime_dir)
    if cfg.adapter == "cln":
        assert cfg.cln_hsm_secret is not None  # the config requires it
        return [SecretFile(Path(cfg.cln_hsm_secret), base / "hsm_secret", "hsm_secret")]
    if cfg.adapter == "eclair":
        files = []
        for sealed in cfg.eclair_seeds or ():
            name = Path(sealed).name.removesuffix(".sealed")
            files.append(SecretFile(Path(sealed), base / name, name))
        return files
    return [
        SecretFile(Path(f.sealed), Path(f.target), Path(f.target).name)
        for f in cfg.command_files or ()
    ]


def custody_from_config(cfg: KeysConfig, events: EventLog) -> KeyCustody:
    """The custody that `cfg` ([keys]) describes.

    Raises KeyCustodyError when the configuration cannot work on this
    machine (an unknown owner, a role that is not a plain file name, a target
    that is also a sealed file).
    """
    if cfg.adapter == "none":
        return NoCustody()
    kek = KekSource(
        file=Path(cfg.kek_file) if cfg.kek_file else None, credential=cfg.kek_credential
    )
    if cfg.adapter == "lnd":
        assert cfg.lnd_rpc and cfg.lnd_tls_cert and cfg.lnd_wallet_password  # the config requires
        settings = LndSettings(
            rpc=cfg.lnd_rpc,
            tls_cert=Path(cfg.lnd_tls_cert),
            sealed_password=Path(cfg.lnd_wallet_password),
            timeout=cfg.lnd_timeout,
        )
        return LndCustody(settings, kek, events)
    owner = Owner.parse(cfg.owner) if cfg.owner else None
    try:
        files = _file_list(cfg)
        return FileCustody(cfg.adapter, files, kek, events, Path(cfg.runtime_dir), owner)
    except ValueError as e:  # a role that is not a plain file name
        raise KeyCustodyError(f"keys: {e}") from None
