"""How the command line fails: one line on stderr, exit status 2 for a usage error (a bad flag,
option or setting: nothing was tried) and 1 for a runtime failure (the database, the data dir,
the WAL, the disk or the network said no). Never a traceback for either.

`CommandLine` is the top-level click group; every command under it, whoever adds it, reports
through it. The error families it knows are listed in RUNTIME_ERRORS. Anything else is a bug
and keeps its traceback, which is what a bug report needs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from incrementer.config import ConfigError
from incrementer.ingest.wal_reader import WalCorruptError
from incrementer.node.datadir import DataDirError
from incrementer.store.base import BackendError

USAGE = 2
RUNTIME = 1
INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
RUNTIME_ERRORS = (BackendError, DataDirError, WalCorruptError, OSError)


class CommandLine(click.Group):
    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's main, with the failures reported here: click's own report of a usage error
        is four lines (usage, hint, blank, error) and it knows nothing of ours."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            fail(usage_message(exc), USAGE)
        except click.Abort:
            fail("interrupted", INTERRUPTED)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except ConfigError as exc:
            fail(str(exc), USAGE)
        except BrokenPipeError:
            sys.exit(RUNTIME)  # the reader went away (`| head`): nobody is left to tell
        except RUNTIME_ERRORS as exc:
            fail(str(exc) or type(exc).__name__, RUNTIME)
        sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, status: int) -> NoReturn:
    # Driver messages carry newlines and tabs (libpq's hints): one line, whatever they say.
    click.echo(f"incrementer: {' '.join(message.split())}", err=True)
    sys.exit(status)


def usage_message(exc: click.UsageError) -> str:
    """click's message, naming the environment variable when a bad value came from one, and
    where to read the command's options."""
    if isinstance(exc, click.BadParameter) and exc.ctx is not None and exc.param is not None:
        envvar = _envvar_used(exc.ctx, exc.param)
        if envvar is not None:
            exc.param_hint = envvar
    message = exc.format_message()
    if exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} -h')"
    return message


def _envvar_used(ctx: click.Context, param: click.Parameter) -> str | None:
    if ctx.get_parameter_source(param.name or "") != ParameterSource.ENVIRONMENT:
        return None
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    return next((name for name in names if name in os.environ), None)
