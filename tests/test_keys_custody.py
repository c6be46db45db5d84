"""File custody (cln, eclair, command): materialize, destroy, leftovers, events, no leaks."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio

from haproxy_ln.config import Config, KeysConfig
from haproxy_ln.errors import KeyCustodyError, SealedFileError
from haproxy_ln.events import EventLog, read_events
from haproxy_ln.keys import FileCustody, NoCustody, custody_from_config
from haproxy_ln.keys.custody import SecretFile
from haproxy_ln.keys.files import temp_name
from haproxy_ln.keys.sealing import Kek, KekSource, seal

HSM_SECRET = bytes(range(100, 132))
NODE_SEED = b"node seed bytes: 0123456789abcdef"
CHANNEL_SEED = b"channel seed bytes: fedcba9876543210"


class Setup:
    """A KEK file, sealed files, a runtime directory and an event log under one tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.kek = Kek.generate()
        self.kek_file = tmp_path / "kek"
        self.kek_file.write_bytes(self.kek.to_text())
        self.kek_file.chmod(0o400)
        self.sealed_dir = tmp_path / "sealed"
        self.sealed_dir.mkdir()
        self.runtime_dir = tmp_path / "run" / "keys"
        self.events_path = tmp_path / "events.jsonl"
        self.events = EventLog(self.events_path, "a")

    def seal(self, name: str, secret: bytes, role: str | None = None) -> Path:
        path = self.sealed_dir / f"{name}.sealed"
        path.write_bytes(seal(secret, self.kek, role or name))
        return path

    def keys_config(self, **values: object) -> KeysConfig:
        return KeysConfig.model_validate(
            {"kek_file": str(self.kek_file), "runtime_dir": str(self.runtime_dir), **values}
        )

    def cln(self) -> FileCustody:
        sealed = self.seal("hsm_secret", HSM_SECRET)
        custody = custody_from_config(
            self.keys_config(adapter="cln", cln_hsm_secret=str(sealed)), self.events
        )
        assert isinstance(custody, FileCustody)
        return custody

    def kinds(self) -> list[tuple[str, dict[str, object]]]:
        if not self.events_path.exists():
            return []
        return [(e.kind, e.fields) for e in read_events(self.events_path)]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_cln_materialize_writes_hsm_secret_0400_in_a_private_runtime_dir(
    setup: Setup,
) -> None:
    custody = setup.cln()
    assert not custody.held
    await custody.materialize()
    target = setup.runtime_dir / "hsm_secret"
    assert custody.held
    assert target.read_bytes() == HSM_SECRET
    assert mode_of(target) == 0o400
    assert mode_of(setup.runtime_dir) == 0o700
    assert not temp_name(target).exists()
    assert setup.kinds() == [("keys.materialized", {"adapter": "cln", "files": 1})]


async def test_destroy_removes_the_files_then_records_it(setup: Setup) -> None:
    custody = setup.cln()
    await custody.materialize()
    target = setup.runtime_dir / "hsm_secret"
    seen_when_recorded: list[bool] = []
    emit = setup.events.emit

    def spying_emit(kind: str, **fields: object) -> object:
        seen_when_recorded.append(target.exists())
        return emit(kind, **fields)  # type: ignore[arg-type]

    setup.events.emit = spying_emit  # type: ignore[method-assign]
    await custody.destroy()
    assert not target.exists()
    assert not custody.held
    assert seen_when_recorded == [False]  # "keys.destroyed" only once the file was gone
    assert [k for k, _ in setup.kinds()] == ["keys.materialized", "keys.destroyed"]


async def test_destroy_overwrites_before_unlinking(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    custody = setup.cln()
    await custody.materialize()
    target = setup.runtime_dir / "hsm_secret"
    contents_at_unlink: list[bytes] = []
    real_unlink = os.unlink

    def spying_unlink(path: str | os.PathLike[str]) -> None:
        if Path(path) == target:
            contents_at_unlink.append(target.read_bytes())
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", spying_unlink)
    await custody.destroy()
    assert contents_at_unlink == [bytes(len(HSM_SECRET))]


async def test_destroy_when_nothing_is_held_records_nothing(setup: Setup) -> None:
    custody = setup.cln()
    await custody.destroy()
    await custody.destroy()
    assert setup.kinds() == []


async def test_materialize_twice_records_once_and_keeps_files_whole(setup: Setup) -> None:
    custody = setup.cln()
    await custody.materialize()
    (setup.runtime_dir / "hsm_secret").unlink()  # e.g. a destroy() that failed half-way
    await custody.materialize()
    assert (setup.runtime_dir / "hsm_secret").read_bytes() == HSM_SECRET
    assert [k for k, _ in setup.kinds()] == ["keys.materialized"]


async def test_destroy_finishes_even_when_cancelled(setup: Setup) -> None:
    custody = setup.cln()
    await custody.materialize()
    with trio.CancelScope() as scope:
        scope.cancel()
        await custody.destroy()
    assert not (setup.runtime_dir / "hsm_secret").exists()
    assert not custody.held


async def test_eclair_writes_each_seed_under_its_name_into_target_dir(setup: Setup) -> None:
    datadir = setup.tmp / "eclair"
    datadir.mkdir(mode=0o700)
    seeds = [setup.seal("node_seed.dat", NODE_SEED), setup.seal("channel_seed.dat", CHANNEL_SEED)]
    cfg = setup.keys_config(
        adapter="eclair", eclair_seeds=[str(s) for s in seeds], target_dir=str(datadir)
    )
    custody = custody_from_config(cfg, setup.events)
    await custody.materialize()
    assert (datadir / "node_seed.dat").read_bytes() == NODE_SEED
    assert (datadir / "channel_seed.dat").read_bytes() == CHANNEL_SEED
    assert mode_of(datadir / "node_seed.dat") == 0o400
    await custody.destroy()
    assert sorted(p.name for p in datadir.iterdir()) == []
    assert setup.kinds()[-1] == ("keys.destroyed", {"adapter": "eclair", "files": 2})


async def test_command_writes_any_files_to_their_targets(setup: Setup) -> None:
    out = setup.tmp / "daemon"
    out.mkdir(mode=0o750)
    files = [
        {"sealed": str(setup.seal("api.key", b"api key material")), "target": str(out / "api.key")},
        {
            "sealed": str(setup.seal("x", b"other", role="node.pem")),
            "target": str(out / "node.pem"),
        },
    ]
    custody = custody_from_config(
        setup.keys_config(adapter="command", command_files=files), setup.events
    )
    await custody.materialize()
    assert (out / "api.key").read_bytes() == b"api key material"
    assert (out / "node.pem").read_bytes() == b"other"
    await custody.destroy()
    assert list(out.iterdir()) == []


async def test_bad_sealed_file_fails_before_anything_is_held(setup: Setup) -> None:
    sealed = setup.seal("hsm_secret", HSM_SECRET)
    sealed.write_bytes(sealed.read_bytes()[:-1])
    custody = custody_from_config(
        setup.keys_config(adapter="cln", cln_hsm_secret=str(sealed)), setup.events
    )
    with pytest.raises(SealedFileError, match=r"hsm_secret\.sealed: authentication failed"):
        await custody.materialize()
    assert not custody.held
    assert setup.kinds() == []
    assert not (setup.runtime_dir / "hsm_secret").exists()


async def test_wrong_kek_fails_at_start_not_at_failover(setup: Setup) -> None:
    custody = setup.cln()
    setup.kek_file.chmod(0o600)
    setup.kek_file.write_bytes(Kek.generate().to_text())
    with pytest.raises(SealedFileError, match="sealed under another KEK"):
        custody.cleanup_at_start()


async def test_runtime_dir_open_to_others_is_refused(setup: Setup) -> None:
    setup.runtime_dir.mkdir(parents=True, mode=0o755)
    setup.runtime_dir.chmod(0o755)
    custody = setup.cln()
    with pytest.raises(KeyCustodyError, match=r"mode 0755: group or others can reach the keys"):
        await custody.materialize()
    assert not custody.held
    assert list(setup.runtime_dir.iterdir()) == []


async def test_target_dir_writable_by_others_is_refused(setup: Setup) -> None:
    datadir = setup.tmp / "lightning"
    datadir.mkdir()
    datadir.chmod(0o777)
    sealed = setup.seal("hsm_secret", HSM_SECRET)
    cfg = setup.keys_config(adapter="cln", cln_hsm_secret=str(sealed), target_dir=str(datadir))
    custody = custody_from_config(cfg, setup.events)
    with pytest.raises(KeyCustodyError, match="group or others can replace files in it"):
        await custody.materialize()
    assert list(datadir.iterdir()) == []


async def test_foreign_file_at_the_target_is_never_overwritten_or_deleted(setup: Setup) -> None:
    custody = setup.cln()
    setup.runtime_dir.mkdir(parents=True, mode=0o700)
    foreign = setup.runtime_dir / "hsm_secret"
    foreign.write_bytes(b"the operator's only other key")
    with pytest.raises(KeyCustodyError, match="exists and is not the secret sealed in"):
        custody.cleanup_at_start()
    with pytest.raises(KeyCustodyError, match="will not overwrite or delete it"):
        await custody.materialize()
    assert foreign.read_bytes() == b"the operator's only other key"
    assert setup.kinds() == []


async def test_cleanup_at_start_removes_what_a_killed_agent_left(setup: Setup) -> None:
    first = setup.cln()
    await first.materialize()  # then the agent is killed: no destroy()
    target = setup.runtime_dir / "hsm_secret"
    temp_name(target).write_bytes(HSM_SECRET[:5])  # and a write was cut short
    restarted = setup.cln()
    restarted.cleanup_at_start()
    assert not target.exists() and not temp_name(target).exists()
    assert setup.kinds()[-1] == ("keys.destroyed", {"adapter": "cln", "files": 1, "leftover": True})
    count = len(setup.kinds())
    restarted.cleanup_at_start()  # nothing left: nothing recorded
    assert len(setup.kinds()) == count


async def test_failed_write_removes_the_partial_secret_and_records_the_end(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    custody = setup.cln()

    def failing_rename(source: object, target: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", failing_rename)  # the temporary file is complete by then
    with pytest.raises(KeyCustodyError, match=r"cannot write .*hsm_secret: Input/output error"):
        await custody.materialize()
    monkeypatch.undo()
    assert not custody.held
    assert list(setup.runtime_dir.iterdir()) == []
    assert [k for k, _ in setup.kinds()] == ["keys.materialized", "keys.destroyed"]


def test_target_that_is_also_a_sealed_file_is_refused(setup: Setup) -> None:
    kek = KekSource(file=setup.kek_file)
    path = setup.tmp / "same"
    with pytest.raises(KeyCustodyError, match="both a sealed file and a target"):
        FileCustody("command", [SecretFile(path, path, "same")], kek, setup.events, setup.tmp)


async def test_secrets_never_reach_logs_errors_reprs_or_events(
    setup: Setup, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    custody = setup.cln()
    texts = [repr(custody), str(custody)]
    await custody.materialize()
    texts += [repr(custody)]
    await custody.destroy()
    custody.cleanup_at_start()
    # Failures too: a foreign file, a tampered sealed file.
    setup.runtime_dir.mkdir(parents=True, exist_ok=True)
    (setup.runtime_dir / "hsm_secret").write_bytes(b"foreign")
    with pytest.raises(KeyCustodyError) as foreign:
        await custody.materialize()
    (setup.runtime_dir / "hsm_secret").unlink()
    sealed = setup.sealed_dir / "hsm_secret.sealed"
    sealed.write_bytes(sealed.read_bytes()[:-3] + b"xyz")
    with pytest.raises(SealedFileError) as tampered:
        await custody.materialize()
    texts += [str(foreign.value), repr(foreign.value), str(tampered.value), repr(tampered.value)]
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err, setup.events_path.read_text()]
    blob = "\n".join(texts)
    for form in (HSM_SECRET.hex(), repr(HSM_SECRET)[2:-1], setup.kek.to_text().decode().strip()):
        assert form not in blob
    assert "keys.materialized" in caplog.text  # the logs were captured at all


def test_none_adapter_holds_nothing(setup: Setup) -> None:
    custody = custody_from_config(KeysConfig(), setup.events)
    assert isinstance(custody, NoCustody)
    assert not custody.held


async def test_none_adapter_operations_do_nothing(setup: Setup) -> None:
    custody = custody_from_config(KeysConfig(), setup.events)
    await custody.materialize()
    await custody.unlock()
    await custody.destroy()
    custody.cleanup_at_start()
    assert setup.kinds() == []


def test_unknown_owner_is_refused_when_the_custody_is_built(setup: Setup) -> None:
    sealed = setup.seal("hsm_secret", HSM_SECRET)
    cfg = setup.keys_config(adapter="cln", cln_hsm_secret=str(sealed), owner="no-such-user-xq")
    with pytest.raises(KeyCustodyError, match="no user 'no-such-user-xq'"):
        custody_from_config(cfg, setup.events)


async def test_owner_gets_the_files_and_the_runtime_dir(setup: Setup) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    sealed = setup.seal("hsm_secret", HSM_SECRET)
    cfg = setup.keys_config(adapter="cln", cln_hsm_secret=str(sealed), owner="nobody")
    custody = custody_from_config(cfg, setup.events)
    await custody.materialize()
    import pwd

    nobody = pwd.getpwnam("nobody")
    target = setup.runtime_dir / "hsm_secret"
    assert (target.stat().st_uid, target.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert setup.runtime_dir.stat().st_uid == nobody.pw_uid
    await custody.destroy()
    assert not target.exists()


# --- configuration -------------------------------------------------------------------------------


def config_problems(text: str) -> list[str]:
    import tomllib

    from pydantic import ValidationError

    from haproxy_ln.config import format_problems

    try:
        Config.model_validate(tomllib.loads('[node]\nname = "a"\n[keys]\n' + text))
    except ValidationError as e:
        return format_problems(Config, e)
    return []


def test_keys_default_to_no_custody() -> None:
    assert KeysConfig().adapter == "none"
    assert KeysConfig().runtime_dir == "/run/haproxy-ln/keys"
    assert config_problems("") == []


def test_lnd_adapter_without_its_settings_names_each_missing_key() -> None:
    problems = config_problems('adapter = "lnd"\nkek_file = "/etc/haproxy-ln/kek"\n')
    assert [p.split(":")[0] for p in problems] == [
        "keys.lnd_rpc",
        "keys.lnd_tls_cert",
        "keys.lnd_wallet_password",
    ]
    assert all('required when adapter = "lnd"' in p for p in problems)


def test_both_kek_file_and_credential_is_an_error() -> None:
    problems = config_problems(
        'adapter = "cln"\nkek_file = "/k"\nkek_credential = "kek"\ncln_hsm_secret = "/s"\n'
    )
    assert problems == [
        "keys.kek_credential: got 'kek'; expected one of kek_file and kek_credential; both are set"
    ]


def test_no_kek_with_an_adapter_is_an_error() -> None:
    problems = config_problems('adapter = "cln"\ncln_hsm_secret = "/s"\n')
    assert len(problems) == 1 and problems[0].startswith("keys.kek_credential: missing")


def test_settings_of_another_adapter_are_errors() -> None:
    problems = config_problems(
        'adapter = "cln"\nkek_credential = "kek"\ncln_hsm_secret = "/s"\n'
        'lnd_rpc = "127.0.0.1:10009"\n'
    )
    assert problems == [
        "keys.lnd_rpc: got '127.0.0.1:10009'; expected no lnd_rpc: it is used only when adapter "
        '= "lnd"; adapter is "cln"'
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('eclair_seeds = ["/s/seed.dat"]', "sealed files named <name>.sealed"),
        ("eclair_seeds = []", "sealed files named <name>.sealed"),
        ('eclair_seeds = ["/a/x.sealed", "/b/x.sealed"]', "distinct names"),
        ('eclair_seeds = ["x.sealed"]', "an absolute path"),
    ],
)
def test_bad_eclair_seeds(line: str, problem: str) -> None:
    problems = config_problems(f'adapter = "eclair"\nkek_credential = "kek"\n{line}\n')
    assert len(problems) == 1 and problem in problems[0]


def test_command_files_need_distinct_targets() -> None:
    problems = config_problems(
        'adapter = "command"\nkek_credential = "kek"\n'
        'command_files = [{sealed = "/a", target = "/t"}, {sealed = "/b", target = "/t"}]\n'
    )
    assert len(problems) == 1 and "each target once" in problems[0]


def test_full_lnd_config_loads() -> None:
    assert (
        config_problems(
            'adapter = "lnd"\nkek_credential = "haproxy-ln-kek"\nlnd_rpc = "127.0.0.1:10009"\n'
            'lnd_tls_cert = "/var/lib/lnd/tls.cert"\n'
            'lnd_wallet_password = "/etc/haproxy-ln/wallet-password.sealed"\n'
        )
        == []
    )


def test_example_config_documents_every_keys_setting() -> None:
    import re

    example = Path(__file__).resolve().parent.parent / "config" / "haproxy-ln.example.toml"
    section = example.read_text(encoding="utf-8").split("\n[keys]\n", 1)[1].split("\n[", 1)[0]
    named = set(re.findall(r"^#? ?([a-z_]+) = ", section, flags=re.MULTILINE))
    assert named == set(KeysConfig.model_fields)
