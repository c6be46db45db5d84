"""`haproxy-ln chaos`: run fault-injection trials on a local pair and sum them up.

Only click is imported up front; the suite is imported when the command runs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType

import click

__all__ = ["chaos"]

NEMESIS_NAMES = (
    "kill-active-agent",
    "kill-active-postgres",
    "kill-standby-agent",
    "kill-standby-postgres",
    "pause-active-agent",
    "pause-active-postgres",
    "partition-active-etcd",
    "partition-replica-link",
    "kill-etcd-leader",
    "hostile-clients",
    "fill-standby-disk",
    "lose-both-nodes-in-turn",
    "degrade-then-lose-active",
)


@click.command("chaos")
@click.option("--trials", type=click.IntRange(1), default=len(NEMESIS_NAMES), show_default=True)
@click.option("--seed", type=click.IntRange(0), default=1, show_default=True)
@click.option(
    "--nemesis",
    "nemeses",
    multiple=True,
    type=click.Choice(NEMESIS_NAMES),
    help="A fault to inject (repeat for several) [all of them, taking turns].",
)
@click.option("--mode", type=click.Choice(["cln", "lnd"]), default="cln", show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(1, 500),
    default=20.0,
    show_default=True,
    help="Simulated channel updates per second.",
)
@click.option(
    "--results",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("chaos-results.jsonl"),
    show_default=True,
    help="One JSON line per trial.",
)
@click.option("--keep", is_flag=True, help="Keep the working directory (logs, databases).")
@click.option("--json", "as_json", is_flag=True, help="End with a JSON summary line.")
def chaos(
    trials: int,
    seed: int,
    nemeses: tuple[str, ...],
    mode: str,
    rate: float,
    results: Path,
    keep: bool,
    as_json: bool,
) -> None:
    """Inject faults into a pair on this machine, trial after trial, and check that there was
    one signer and no lost acknowledged write. Needs root (tmpfs), PostgreSQL 15 and etcd."""
    from haproxy_ln.chaos.report import summarize, table
    from haproxy_ln.chaos.trials import ChaosOptions, run_chaos
    from haproxy_ln.cli import setup_logging
    from haproxy_ln.errors import HaproxyLnError

    setup_logging("warning")
    signal.signal(signal.SIGTERM, _terminate)  # stop the pair on the way out, as on Ctrl-C
    options = ChaosOptions(trials, seed, nemeses or NEMESIS_NAMES, mode, rate, results, keep)
    started = time.monotonic()
    try:
        ran = run_chaos(options, click.echo)
    except HaproxyLnError as e:
        click.echo(f"error: {e}", err=True)
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(e)}))
        raise SystemExit(2) from None
    summary = summarize(ran)
    click.echo("")
    click.echo(table(summary))
    verdict = "no safety violation" if summary.ok else "SAFETY VIOLATED"
    click.echo(
        f"\n{len(ran)} trials in {time.monotonic() - started:.0f} s ({mode}, seed {seed}): "
        f"{verdict}; results in {results}"
    )
    if as_json:
        click.echo(json.dumps(summary.as_json()))
    raise SystemExit(0 if summary.ok else 1)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
