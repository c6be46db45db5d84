"""`haproxy-ln sim run` and `haproxy-ln sim check`: the simulator's command line.

Only click and the standard library are imported up front; the simulator
itself (psycopg, grpcio) is imported when a command runs, so the rest of the
CLI starts as fast without it.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from pathlib import Path

import click

__all__ = ["sim"]

FILE = click.Path(path_type=Path)


@click.group("sim")
def sim() -> None:
    """The Lightning daemon simulator, for drills and tests (no bitcoind needed)."""


def _only(mode: str, given: dict[str, object], allowed: dict[str, set[str]]) -> None:
    for option, value in given.items():
        if value is not None and mode not in allowed[option]:
            other = " and ".join(sorted(allowed[option]))
            raise click.UsageError(f"--{option.replace('_', '-')} is for --mode {other} only")


@sim.command("run")
@click.option("--mode", type=click.Choice(["cln", "lnd"]), required=True, help="Daemon to play.")
@click.option(
    "--dsn",
    required=True,
    metavar="URL",
    help="Database to use, normally through the haproxy-ln proxy "
    "(postgresql://user@127.0.0.1:6432/lightning; a password may come from $PGPASSWORD).",
)
@click.option(
    "--journal", type=FILE, required=True, help="Acknowledged-state journal to append to."
)
@click.option("--node", help="Node name written in the journal [the host name].")
@click.option("--key-file", type=FILE, help="cln: the hsm_secret; refuses to start without it.")
@click.option("--password-file", type=FILE, help="lnd: the file holding the wallet password.")
@click.option("--tls-cert", type=FILE, help="lnd: where to write (or read) the TLS certificate.")
@click.option("--tls-key", type=FILE, help="lnd: its key [the certificate's path, with .key].")
@click.option("--rpc", metavar="HOST:PORT", help="lnd: gRPC address [127.0.0.1:10009].")
@click.option("--pool", type=click.IntRange(1, 64), help="lnd: database connections [4].")
@click.option("--channels", type=click.IntRange(1, 10_000), default=4, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Channel updates per second (0: as fast as possible).",
)
@click.option("--count", type=click.IntRange(0), help="Stop after this many updates.")
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds."
)
@click.option("--seed", type=int, help="Seed of the random workload [random].")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def sim_run(
    mode: str,
    dsn: str,
    journal: Path,
    node: str | None,
    key_file: Path | None,
    password_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    rpc: str | None,
    pool: int | None,
    channels: int,
    rate: float,
    count: int | None,
    duration: float | None,
    seed: int | None,
    log_level: str,
) -> None:
    """Play a Lightning daemon on a database until --count, --duration or SIGTERM.

    Exits 0 when stopped, 1 when it stops as a daemon would crash (data_version
    check failed, database connection lost, key file missing, ...)."""
    from haproxy_ln.config import HostPort
    from haproxy_ln.errors import SimulatorError
    from haproxy_ln.sim.runner import DEFAULT_RPC, LndWallet, Mode, SimSettings, Simulator

    lnd_only = {"lnd"}
    _only(
        mode,
        {
            "key_file": key_file,
            "password_file": password_file,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "rpc": rpc,
            "pool": pool,
        },
        {"key_file": {"cln"}}
        | dict.fromkeys(("password_file", "tls_cert", "tls_key", "rpc", "pool"), lnd_only),
    )
    wallet = None
    if mode == "lnd":
        if password_file is None or tls_cert is None:
            raise click.UsageError("--mode lnd needs --password-file and --tls-cert")
        try:
            address = HostPort.parse(rpc) if rpc else DEFAULT_RPC
        except ValueError as e:  # pydantic's PydanticCustomError is a ValueError
            raise click.BadParameter(str(e), param_hint="--rpc") from None
        wallet = LndWallet(
            password_file, tls_cert, tls_key or tls_cert.with_suffix(".key"), address
        )
    elif key_file is None:
        raise click.UsageError("--mode cln needs --key-file (the hsm_secret)")
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = SimSettings(
        mode=Mode(mode),
        dsn=dsn,
        journal=journal,
        node=node or socket.gethostname(),
        key_file=key_file,
        wallet=wallet,
        channels=channels,
        rate=rate,
        count=count,
        duration=duration,
        seed=seed,
        pool=pool or 4,
    )
    try:
        simulator = Simulator(settings)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: simulator.request_stop())
        report = simulator.run()
    except SimulatorError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    click.echo(
        f"stopped by {report.stopped_by} after {report.updates} channel updates"
        + (f" ({report.retries} serialization failures retried)" if report.retries else ""),
        err=True,
    )


@sim.command("check")
@click.option("--dsn", required=True, metavar="URL", help="Database of the node active now.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("journals", metavar="JOURNAL...", nargs=-1, required=True, type=FILE)
def sim_check(dsn: str, as_json: bool, journals: tuple[Path, ...]) -> None:
    """Compare simulator journals with a database: lost writes and split brain.

    Exits 0 when every acknowledged state is there and none conflicts, 1 when
    something is lost or a split brain is found, 2 when it cannot check."""
    from haproxy_ln.errors import SimulatorError
    from haproxy_ln.sim.checker import check

    try:
        result = check(list(journals), dsn)
    except SimulatorError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        verdict = "OK" if result.ok else "PROBLEMS FOUND"
        click.echo(
            f"acknowledged {result.acked}, unknown {result.unknown}, lost {result.lost}, "
            f"split brain {result.split_brain}: {verdict}"
        )
        for finding in result.details:
            click.echo(f"  {finding.kind}: [{finding.mode}] {finding.message}")
    raise SystemExit(0 if result.ok else 1)
