"""The `haproxy-ln` command line.

Each command is a short function that parses arguments and delegates to a
module; configuration errors are reported the same way by every command.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import NoReturn

import click
import trio
from pydantic import SecretStr, ValidationError

from haproxy_ln import __version__
from haproxy_ln.chaos.command import chaos
from haproxy_ln.config import (
    Config,
    ProxyConfig,
    ReplicationConfig,
    format_problems,
    load,
    render,
)
from haproxy_ln.errors import ConfigError, HaproxyLnError
from haproxy_ln.proxy.server import run_standalone
from haproxy_ln.sim.command import sim

CONFIG_FILE = click.Path(path_type=Path)  # no checks here: load() reports unreadable files


def fail_config(exc: ConfigError) -> NoReturn:
    """Print every problem of an invalid configuration to stderr and exit 1."""
    click.echo(f"error: {exc.path} is invalid:", err=True)
    for problem in exc.problems:
        click.echo(f"  - {problem}", err=True)
    raise SystemExit(1)


def load_or_exit(path: Path) -> Config:
    """The configuration at `path`, or exit 1 listing its problems."""
    try:
        return load(path)
    except ConfigError as exc:
        fail_config(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="haproxy-ln")
def main() -> None:
    """High availability for Lightning Network nodes' PostgreSQL databases."""


main.add_command(sim)
main.add_command(chaos)


@main.command("check-config")
@click.argument("file", type=CONFIG_FILE)
def check_config(file: Path) -> None:
    """Validate FILE and print the effective configuration, defaults included."""
    click.echo(render(load_or_exit(file)), nl=False)


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on [127.0.0.1:6432].")
@click.option("--upstream", metavar="HOST:PORT", help="PostgreSQL to forward to [127.0.0.1:5432].")
@click.option(
    "--config",
    "config_file",
    type=CONFIG_FILE,
    help="Take the [proxy] settings from this node configuration; options override it.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def proxy(
    listen: str | None, upstream: str | None, config_file: Path | None, log_level: str
) -> None:
    """Run the PostgreSQL proxy alone, gate open, until SIGTERM or SIGINT."""
    base = load_or_exit(config_file).proxy if config_file else ProxyConfig()
    overrides = {k: v for k, v in (("listen", listen), ("upstream", upstream)) if v}
    try:
        config = ProxyConfig.model_validate({**dict(base), **overrides})
    except ValidationError as exc:
        fail_config(ConfigError("command line", format_problems(ProxyConfig, exc)))
    setup_logging(log_level)
    trio.run(run_standalone, config)


def _replication_config(
    config_file: Path | None, overrides: dict[str, object]
) -> tuple[ReplicationConfig, str]:
    """[replication] from the file (or defaults) with command-line overrides, and the node name."""
    loaded = load_or_exit(config_file) if config_file else None
    base = dict(loaded.replication) if loaded else {}
    for key, env in (
        ("source_password", "HAPROXY_LN_SOURCE_PASSWORD"),
        ("replica_password", "HAPROXY_LN_REPLICA_PASSWORD"),
    ):
        if env in os.environ:
            base[key] = SecretStr(os.environ[env])
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = ReplicationConfig.model_validate({**base, **given})
    except ValidationError as exc:
        fail_config(ConfigError("command line", format_problems(ReplicationConfig, exc)))
    return config, loaded.node.name if loaded else "standalone"


def replication_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options shared by the commands that replicate."""
    options = [
        click.option("--source", metavar="URL", help="Primary (postgresql://user@host:port/db)."),
        click.option("--replica", metavar="URL", help="Replica store."),
        click.option("--sync-name", help="application_name for synchronous_standby_names."),
        click.option("--slot", help="Replication slot name."),
        click.option(
            "--epoch",
            type=click.IntRange(1),
            default=1,
            show_default=True,
            help="Fencing epoch written with every change.",
        ),
        click.option(
            "--config",
            "config_file",
            type=CONFIG_FILE,
            help="Take [replication] from this node configuration; options override it.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_trio(job: Callable[[], Awaitable[None]]) -> None:
    """trio.run(job); exit 1 printing each haproxy-ln error it raised."""
    try:
        trio.run(job)
    except* HaproxyLnError as group:
        for e in leaves(group):
            click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None


def run_replication(
    job: Callable[..., Awaitable[None]],
    config_file: Path | None,
    epoch: int,
    log_level: str,
    overrides: dict[str, str | None],
) -> None:
    config, node = _replication_config(config_file, dict(overrides))
    setup_logging(log_level)
    run_trio(partial(job, config, node=node, epoch=epoch))


@main.command()
@click.option(
    "--config", "config_file", type=CONFIG_FILE, required=True, help="This node's configuration."
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def run(config_file: Path, log_level: str) -> None:
    """Run this node's agent until SIGTERM: proxy, etcd lease, replication, keys, daemon."""
    from haproxy_ln.agent.run import run_agent

    config = load_or_exit(config_file)
    setup_logging(log_level)
    run_trio(partial(run_agent, config))


@main.command("switchover")
@click.option(
    "--config", "config_file", type=CONFIG_FILE, required=True, help="A node's configuration."
)
@click.option("--to", "target", metavar="NODE", help="The node to hand over to [the peer].")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the handover.",
)
def switchover_command(config_file: Path, target: str | None, timeout: float) -> None:
    """Hand over from the active node to the standby with no lease wait and no lost write."""
    from haproxy_ln.agent.switchover import switchover

    config = load_or_exit(config_file)
    setup_logging("warning")

    async def job() -> None:
        click.echo(await switchover(config, target, timeout))

    run_trio(job)


@main.command("promote")
@click.option(
    "--config", "config_file", type=CONFIG_FILE, required=True, help="The node to promote."
)
@click.option(
    "--accept-data-loss",
    is_flag=True,
    help="Required: writes the old active acknowledged without this node's replica are lost.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the takeover.",
)
def promote_command(config_file: Path, accept_data_loss: bool, timeout: float) -> None:
    """Make this node take over although the sync record does not name it: only while no
    node is active, and only with --accept-data-loss."""
    from haproxy_ln.agent.promote import force_promotion

    config = load_or_exit(config_file)
    if not accept_data_loss:
        click.echo(
            "error: a forced promotion loses every write the old active acknowledged without "
            f"{config.node.name}'s replica; if the old active is gone for good, run again with "
            "--accept-data-loss",
            err=True,
        )
        raise SystemExit(1)
    setup_logging("warning")

    async def job() -> None:
        click.echo(await force_promotion(config, timeout))

    run_trio(job)


@main.command("status")
@click.option(
    "--config", "config_file", type=CONFIG_FILE, required=True, help="A node's configuration."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status_command(config_file: Path, as_json: bool) -> None:
    """Show both nodes of the pair: etcd's leader and sync record, and each node's /status
    (this node's at [health] listen, the peer's at [node] peer_health). Exit 1 if etcd
    cannot be read."""
    import json

    from haproxy_ln.health.status import gather, render_table

    config = load_or_exit(config_file)
    setup_logging("error")
    pair = trio.run(gather, config)
    click.echo(json.dumps(pair.as_json(), indent=2) if as_json else render_table(pair))
    raise SystemExit(0 if pair.etcd.get("reachable") else 1)


@main.command()
@replication_options
@click.option("--mode", type=click.Choice(["sync", "strict"]), help="On stop: sync stops waiting.")
def replicate(
    config_file: Path | None, epoch: int, log_level: str, **overrides: str | None
) -> None:
    """Run the replicator alone until SIGTERM: bootstrap, initial copy if the replica is
    empty, then synchronous streaming. Passwords come from the config file or from
    $HAPROXY_LN_SOURCE_PASSWORD and $HAPROXY_LN_REPLICA_PASSWORD."""
    from haproxy_ln.replicator.standalone import run_replicate

    run_replication(run_replicate, config_file, epoch, log_level, overrides)


@main.command()
@replication_options
def reseed(config_file: Path | None, epoch: int, log_level: str, **overrides: str | None) -> None:
    """Copy the primary into the replica store again, from scratch, now.

    Refuses a replica store fenced at a higher epoch. Stop the replicator first."""
    from haproxy_ln.replicator.standalone import run_reseed

    run_replication(run_reseed, config_file, epoch, log_level, overrides)


@main.command("log")
@click.option(
    "--store",
    metavar="URL",
    help="Replica store to read [this node's PostgreSQL: [replication] source of --config].",
)
@click.option("--config", "config_file", type=CONFIG_FILE, help="Node configuration.")
@click.option("--since", metavar="TIME", help='Oldest commit time, e.g. "2026-11-21 08:00Z".')
@click.option("--until", metavar="TIME", help="Commit time to stop before.")
@click.option("--table", help="Only transactions touching this table (schema.table or name).")
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Most recent transactions to show.",
)
@click.option("--changes", is_flag=True, help="Show every change with its values.")
def log_command(
    store: str | None,
    config_file: Path | None,
    since: str | None,
    until: str | None,
    table: str | None,
    limit: int,
    changes: bool,
) -> None:
    """Print the transactions this node's replica store applied (the txlog)."""
    from haproxy_ln.replicator.standalone import print_log

    config, _ = _replication_config(config_file, {"source": store})
    run_trio(
        partial(
            print_log,
            config.source_target(),
            since=since,
            until=until,
            table=table,
            limit=limit,
            changes=changes,
            echo=click.echo,
        )
    )


@main.command()
@click.option(
    "--seconds",
    type=click.FloatRange(1, 3600),
    default=5.0,
    show_default=True,
    help="Traffic before the failover (later phases run half as long).",
)
@click.option("--keep", is_flag=True, help="Leave the pair running until Ctrl-C, to explore.")
@click.option("--json", "as_json", is_flag=True, help="End with a JSON summary line.")
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("haproxy-ln-demo.svg"),
    show_default=True,
    help="Where to write the timeline picture (SVG).",
)
def demo(seconds: float, keep: bool, as_json: bool, chart: Path) -> None:
    """Run a pair on this machine: kill the active node, watch the failover, check that no
    acknowledged write was lost, rejoin, switch back. Needs nothing configured."""
    import json

    from haproxy_ln.demo import run_demo

    setup_logging("warning")
    started = time.monotonic()
    try:
        summary = run_demo(seconds, keep, chart, lambda text: click.echo(text))
    except HaproxyLnError as e:
        click.echo(f"error: {e}", err=True)
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(e)}))
        raise SystemExit(1) from None
    click.echo("")
    click.echo(f"failover (kill -9 of agent a to first write on b): {summary.failover_s} s")
    click.echo(f"switchover (request to first write on a): {summary.switchover_s} s")
    click.echo(
        f"acknowledged writes: {summary.acked_writes}, lost: {summary.lost_writes}, "
        f"split brain: {summary.split_brain}, one-signer overlaps: {summary.one_signer_overlaps}"
    )
    verdict = "OK" if summary.ok else "FAILED"
    click.echo(f"demo {verdict} in {time.monotonic() - started:.0f} s")
    if as_json:
        click.echo(json.dumps(summary.as_json()))
    raise SystemExit(0 if summary.ok else 1)


@main.group()
def keys() -> None:
    """Prepare sealed secrets for key custody ([keys] in the node configuration)."""


@keys.command("new-kek")
@click.argument("file", type=click.Path(path_type=Path))
def keys_new_kek(file: Path) -> None:
    """Write a new random key-encryption key to FILE (mode 0400); never overwrites.

    Give both nodes the same KEK, kept apart from the sealed files: a root-only
    file (kek_file) or a systemd credential (kek_credential)."""
    from haproxy_ln.keys.tools import new_kek

    try:
        kek = new_kek(file)
    except HaproxyLnError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote a new KEK to {file} (key id {kek.key_id.hex()})")


@keys.command("seal")
@click.option(
    "--kek",
    "kek_file",
    required=True,
    type=click.Path(path_type=Path),
    help="File holding the key-encryption key.",
)
@click.option(
    "--role",
    help="Name the secret is written as, e.g. hsm_secret, node_seed.dat or "
    "lnd-wallet-password [the name of IN].",
)
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
def keys_seal(kek_file: Path, role: str | None, source: Path, output: Path) -> None:
    """Encrypt the secret file IN into the new sealed file OUT (never overwrites OUT)."""
    from haproxy_ln.keys.tools import seal_file

    try:
        used = seal_file(kek_file, source, output, role)
    except HaproxyLnError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"sealed {source} as role {used!r} into {output}")
