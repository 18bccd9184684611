"""`croft cluster ...`: what LXD's `lxd cluster ...` does on a stopped member."""

from __future__ import annotations

import asyncio

import click

from croft.client import node
from croft.common.config import ConfigError, load_config
from croft.common.errors import CroftError
from croft.node.recovery import recover_from_quorum_loss

# LXD 5.0.2's prompt (lxd/main_cluster.go), with croft's names.
_WARNING = """You should run this command only if you are *absolutely* certain that this is
the only database node left in your cluster AND that other database nodes will
never come back (i.e. their croft won't ever be started again).

This will make this croft instance the only member of the cluster, and it won't
be possible to perform operations on former cluster members anymore.

However all information about former cluster members will be preserved in the
database, so you can possibly inspect it for further recovery.

You'll be able to permanently delete from the database all information about
former cluster members by running "lxc cluster remove <member-name> --force".

Do you want to proceed? (yes/no): """


@click.group()
def cluster() -> None:
    """Low-level cluster administration (LXD's `lxd cluster`)."""


@cluster.command("recover-from-quorum-loss")
@click.option("-q", "--quiet", is_flag=True, help="Don't require user confirmation")
def recover(quiet: bool) -> None:
    """Recover a croft instance whose cluster has lost quorum: this member's store becomes
    the cluster's, alone, with all its records."""
    try:
        config = load_config()
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(2) from None
    if node.agent_pid(config) is not None:
        click.echo("Error: The croft daemon is running, please stop it first.", err=True)
        raise SystemExit(1)
    if not quiet:
        answer = click.prompt(_WARNING, default="", show_default=False, prompt_suffix="")
        if answer.strip().lower() != "yes":
            click.echo("Error: Recover operation aborted", err=True)
            raise SystemExit(1)
    try:
        dropped = asyncio.run(recover_from_quorum_loss(config))
    except CroftError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
    if dropped:
        click.echo(f"Voters dropped from the store: {', '.join(sorted(dropped))}")
