"""Command line: thin. Builds Settings and calls into the service, the migrator, the WAL or the
keys. Every command takes --config and the INCREMENTER_* variables for the settings it uses
(options.py), and reports failures through errors.CommandLine: one line, exit 2 for usage, 1 at
run time. The commands of each concern live beside this one: keys.py, wal.py, incr.py, top.py.

Shell completion comes from click: `eval "$(_INCREMENTER_COMPLETE=bash_source incrementer)"`
(zsh_source, fish_source for the other shells; docs/operations.md).
"""

from __future__ import annotations

import os
import sys

import click

from incrementer.cli.errors import RUNTIME_ERRORS, CommandLine
from incrementer.cli.incr import incr_command
from incrementer.cli.keys import keys
from incrementer.cli.options import settings_options
from incrementer.cli.top import top
from incrementer.cli.wal import wal
from incrementer.config import Settings

__all__ = ["main"]


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="incrementer")
def main() -> None:
    """incrementer: counter increments over HTTP, coalesced, logged, flushed exactly once.

    Every command reads its settings from flags, INCREMENTER_* environment variables and the TOML
    file named by --config; `incrementer COMMAND -h` lists them. A failure is one line on stderr,
    exit status 2 for a usage error and 1 for a failure at run time.
    """


@main.command()
@settings_options()
def serve(settings: Settings) -> None:
    """Run the service."""
    from incrementer import logs
    from incrementer.service import Service

    logs.configure(settings.log_level, settings.log_format)
    # What the server writes is its owner's alone, whatever umask it was started with: each file
    # it creates is made 0600 and each directory 0700 explicitly, and this also covers the files
    # its libraries create (prometheus-client's metrics files in a --workers group's run dir).
    os.umask(os.umask(0o077) | 0o077)
    if settings.workers > 1:
        from incrementer.process.supervisor import CannotStart, Supervisor

        try:
            code = Supervisor(settings).run()
        except (CannotStart, *RUNTIME_ERRORS) as exc:
            raise click.ClickException(f"cannot start: {exc}") from None
        sys.exit(code)  # 1: a worker did not drain cleanly (the log says which)
    import uvloop

    service = Service(settings)
    try:
        uvloop.run(service.serve())
    except RUNTIME_ERRORS as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    if not service.clean:
        sys.exit(1)  # the log says what was left unflushed (in the WAL, replayed at next start)


@main.command("migrate")
@settings_options("database_url")
def migrate_command(settings: Settings) -> None:
    """Apply pending schema migrations."""
    from incrementer.store.migrate import migrate

    applied = migrate(settings.database_url)
    click.echo(
        f"applied {len(applied)} migrations"
        + (f": {', '.join(applied)}" if applied else " (schema up to date)")
    )


main.add_command(incr_command)
main.add_command(wal)
main.add_command(keys)
main.add_command(top)
