"""The `haproxy-ln` command line.

Each command is a short function that parses arguments and delegates to a
module; configuration errors are reported the same way by every command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import click
import trio
from pydantic import ValidationError

from haproxy_ln import __version__
from haproxy_ln.config import Config, ProxyConfig, format_problems, load, render
from haproxy_ln.errors import ConfigError
from haproxy_ln.proxy.server import run_standalone

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


@main.command("check-config")
@click.argument("file", type=CONFIG_FILE)
def check_config(file: Path) -> None:
    """Validate FILE and print the effective configuration, defaults included."""
    click.echo(render(load_or_exit(file)), nl=False)


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


@main.command()
@click.option("--seconds", type=click.IntRange(1, 3600), default=10, show_default=True)
@click.option("--clients", type=click.IntRange(1, 64), default=4, show_default=True)
def demo(seconds: int, clients: int) -> None:
    """Start a local PostgreSQL and the proxy in front of it; run pgbench through it."""
    from haproxy_ln.demo import run_demo

    raise SystemExit(run_demo(seconds, clients, lambda text: click.echo(f"* {text}", err=True)))
