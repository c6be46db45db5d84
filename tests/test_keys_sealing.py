"""Sealed files and KEKs: round trips, every way a file can be wrong, the CLI that makes them."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from haproxy_ln.cli import main
from haproxy_ln.errors import KeyCustodyError, SealedFileError
from haproxy_ln.keys.sealing import (
    MAGIC,
    MAX_SECRET_SIZE,
    Kek,
    KekSource,
    Secret,
    open_sealed,
    seal,
    unseal,
)

SECRET = bytes(range(7, 39))  # 32 bytes, like an hsm_secret
ROLE = "hsm_secret"


def secret_texts(secret: bytes) -> list[str]:
    """Ways a secret could leak into text: hex, repr of the bytes, and decoded if it decodes."""
    texts = [secret.hex(), repr(secret)[2:-1]]
    with contextlib.suppress(UnicodeDecodeError):
        texts.append(secret.decode())
    return [t for t in texts if len(t) >= 8]


def assert_no_secret(text: str, *secrets: bytes) -> None:
    for secret in secrets:
        for form in secret_texts(secret):
            assert form not in text


@pytest.fixture
def kek() -> Kek:
    return Kek.generate()


def test_sealed_secret_opens_with_its_kek_and_role(kek: Kek) -> None:
    sealed = seal(SECRET, kek, ROLE)
    assert sealed.startswith(MAGIC)
    assert SECRET not in sealed
    assert unseal(sealed, kek, ROLE, "f").reveal() == SECRET


def test_sealing_twice_gives_different_bytes(kek: Kek) -> None:
    assert seal(SECRET, kek, ROLE) != seal(SECRET, kek, ROLE)  # a fresh nonce each time


def test_empty_and_largest_secrets_round_trip(kek: Kek) -> None:
    for secret in (b"", os.urandom(MAX_SECRET_SIZE)):
        assert unseal(seal(secret, kek, ROLE), kek, ROLE, "f").reveal() == secret
    with pytest.raises(ValueError, match="at most"):
        seal(bytes(MAX_SECRET_SIZE + 1), kek, ROLE)


def test_wrong_kek_is_named_as_such_with_both_key_ids(kek: Kek) -> None:
    other = Kek.generate()
    with pytest.raises(SealedFileError) as info:
        unseal(seal(SECRET, kek, ROLE), other, ROLE, "/etc/x.sealed")
    text = str(info.value)
    assert text.startswith("sealed file /etc/x.sealed: sealed under another KEK")
    assert kek.key_id.hex() in text and other.key_id.hex() in text
    assert info.value.path == "/etc/x.sealed"


def test_every_flipped_byte_is_refused_without_showing_the_secret(kek: Kek) -> None:
    sealed = seal(SECRET, kek, ROLE)
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(SealedFileError) as info:
            unseal(bytes(tampered), kek, ROLE, "f.sealed")
        assert "f.sealed" in str(info.value)
        assert_no_secret(str(info.value) + repr(info.value), SECRET)


def test_ciphertext_tampering_reports_authentication_failure(kek: Kek) -> None:
    sealed = bytearray(seal(SECRET, kek, ROLE))
    sealed[-1] ^= 0x80
    with pytest.raises(SealedFileError, match="authentication failed: the file was altered"):
        unseal(bytes(sealed), kek, ROLE, "f")


def test_every_truncation_is_refused(kek: Kek) -> None:
    sealed = seal(SECRET, kek, ROLE)
    for length in range(len(sealed)):
        with pytest.raises(SealedFileError) as info:
            unseal(sealed[:length], kek, ROLE, "f")
        problem = info.value.problem
        assert problem.startswith(("truncated", "not a haproxy-ln sealed file", "authentication"))


def test_plain_secret_is_not_a_sealed_file(kek: Kek) -> None:
    with pytest.raises(SealedFileError, match="not a haproxy-ln sealed file"):
        unseal(SECRET, kek, ROLE, "hsm_secret")


def test_unknown_version_is_named(kek: Kek) -> None:
    sealed = bytearray(seal(SECRET, kek, ROLE))
    sealed[len(MAGIC)] = 9
    with pytest.raises(SealedFileError, match="version 9 is not supported"):
        unseal(bytes(sealed), kek, ROLE, "f")


def test_secret_sealed_for_another_role_is_refused(kek: Kek) -> None:
    sealed = seal(b"wallet password", kek, "lnd-wallet-password")
    with pytest.raises(SealedFileError) as info:
        unseal(sealed, kek, "hsm_secret", "f")
    assert "sealed for role 'lnd-wallet-password' but configured as 'hsm_secret'" in str(info.value)
    assert "--role hsm_secret" in str(info.value)


def test_role_swapped_in_the_header_fails_authentication(kek: Kek) -> None:
    sealed = seal(SECRET, kek, "seed_a.dat")
    swapped = sealed.replace(b"seed_a.dat", b"seed_b.dat", 1)
    with pytest.raises(SealedFileError, match="authentication failed"):
        unseal(swapped, kek, "seed_b.dat", "f")


@pytest.mark.parametrize("role", ["", "../hsm_secret", "a/b", ".hidden", "x" * 256, "a b"])
def test_roles_must_be_plain_file_names(kek: Kek, role: str) -> None:
    with pytest.raises(ValueError, match="not a plain file name"):
        seal(SECRET, kek, role)


def test_secret_and_kek_never_show_in_repr_or_str(kek: Kek) -> None:
    secret = Secret(SECRET)
    for text in (repr(secret), str(secret), repr(kek), str(kek), f"{secret} {kek!r}"):
        assert_no_secret(text, SECRET, kek.to_text().strip())
    assert "redacted" in repr(secret)
    assert secret.same_as(SECRET) and not secret.same_as(SECRET[:-1] + b"\0")


def test_secret_and_kek_refuse_pickling(kek: Kek) -> None:
    import pickle

    for value in (Secret(SECRET), kek):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(value)


# --- KEK sources ---------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int = 0o400) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_kek_file_in_hex_and_raw_forms_loads_the_same_key(tmp_path: Path, kek: Kek) -> None:
    raw_key = bytes.fromhex(kek.to_text().decode())
    hex_file = write_file(tmp_path / "hex", kek.to_text())
    raw_file = write_file(tmp_path / "raw", raw_key)
    for path in (hex_file, raw_file):
        assert KekSource(file=path).load().key_id == kek.key_id


def test_kek_file_readable_by_others_is_refused(tmp_path: Path, kek: Kek) -> None:
    path = write_file(tmp_path / "kek", kek.to_text(), 0o644)
    with pytest.raises(KeyCustodyError, match=r"mode 0644 lets group or others use it; run chmod"):
        KekSource(file=path).load()


@pytest.mark.parametrize("data", [b"", b"short", b"z" * 64, bytes(33), b"ab" * 40])
def test_malformed_kek_is_refused_without_showing_it(tmp_path: Path, data: bytes) -> None:
    path = write_file(tmp_path / "kek", data)
    with pytest.raises(KeyCustodyError) as info:
        KekSource(file=path).load()
    assert f"found {len(data)} bytes" in str(info.value)
    if len(data) >= 8:
        assert data.decode(errors="replace") not in str(info.value)


def test_missing_kek_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyCustodyError, match=r"KEK file .*/nope: cannot open"):
        KekSource(file=tmp_path / "nope").load()


def test_kek_from_systemd_credential(
    tmp_path: Path, kek: Kek, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_file(tmp_path / "haproxy-ln-kek", kek.to_text(), 0o440)  # systemd's own modes vary
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert KekSource(credential="haproxy-ln-kek").load().key_id == kek.key_id


def test_credential_without_credentials_directory_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(
        KeyCustodyError, match=r"\$CREDENTIALS_DIRECTORY is not set.*LoadCredential"
    ):
        KekSource(credential="kek").load()


def test_kek_source_needs_exactly_one_origin(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        KekSource()
    with pytest.raises(ValueError):
        KekSource(file=tmp_path, credential="kek")


def test_sealed_file_that_is_a_symlink_is_refused(tmp_path: Path, kek: Kek) -> None:
    real = write_file(tmp_path / "real.sealed", seal(SECRET, kek, ROLE))
    link = tmp_path / "link.sealed"
    link.symlink_to(real)
    assert open_sealed(real, kek, ROLE).reveal() == SECRET
    with pytest.raises(SealedFileError, match=r"link\.sealed: cannot open"):
        open_sealed(link, kek, ROLE)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_new_kek_writes_mode_0400_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    result = CliRunner().invoke(main, ["keys", "new-kek", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    kek = KekSource(file=path).load()
    assert kek.key_id.hex() in result.output
    assert path.read_bytes().strip().decode() not in result.output
    before = path.read_bytes()
    again = CliRunner().invoke(main, ["keys", "new-kek", str(path)])
    assert again.exit_code == 1
    assert "already exists; refusing to overwrite it" in again.output
    assert path.read_bytes() == before


def test_cli_seal_makes_a_file_the_custody_opens(tmp_path: Path) -> None:
    kek_path = tmp_path / "kek"
    assert CliRunner().invoke(main, ["keys", "new-kek", str(kek_path)]).exit_code == 0
    source = write_file(tmp_path / "hsm_secret", SECRET, 0o600)
    out = tmp_path / "hsm_secret.sealed"
    result = CliRunner().invoke(
        main, ["keys", "seal", "--kek", str(kek_path), str(source), str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "as role 'hsm_secret'" in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o400
    kek = KekSource(file=kek_path).load()
    assert open_sealed(out, kek, "hsm_secret").reveal() == SECRET
    assert_no_secret(result.output, SECRET)


def test_cli_seal_with_role_and_refusing_to_overwrite(tmp_path: Path) -> None:
    kek_path = tmp_path / "kek"
    CliRunner().invoke(main, ["keys", "new-kek", str(kek_path)])
    source = write_file(tmp_path / "password.txt", b"correct horse battery", 0o600)
    out = write_file(tmp_path / "pw.sealed", b"keep me", 0o600)
    args = ["keys", "seal", "--kek", str(kek_path), "--role", "lnd-wallet-password"]
    result = CliRunner().invoke(main, [*args, str(source), str(out)])
    assert result.exit_code == 1
    assert "already exists; refusing to overwrite it" in result.output
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert CliRunner().invoke(main, [*args, str(source), str(out)]).exit_code == 0
    kek = KekSource(file=kek_path).load()
    assert open_sealed(out, kek, "lnd-wallet-password").reveal() == b"correct horse battery"


def test_cli_seal_with_bad_role_or_missing_input_fails_clearly(tmp_path: Path) -> None:
    kek_path = tmp_path / "kek"
    CliRunner().invoke(main, ["keys", "new-kek", str(kek_path)])
    base = ["keys", "seal", "--kek", str(kek_path)]
    bad_role = CliRunner().invoke(
        main, [*base, "--role", "../x", str(kek_path), str(tmp_path / "o")]
    )
    assert bad_role.exit_code == 1 and "not a plain file name" in bad_role.output
    missing = CliRunner().invoke(main, [*base, str(tmp_path / "nope"), str(tmp_path / "o")])
    assert missing.exit_code == 1 and "nope: no such file" in missing.output
    assert not (tmp_path / "o").exists()
