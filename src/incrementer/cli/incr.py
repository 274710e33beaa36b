"""`incrementer incr KEY [VALUE]`: one increment to a running server, through the Python client
(clients/python), so it is applied exactly once however often it has to be retried."""

from __future__ import annotations

import logging

import click

from incrementer.cli.options import settings_options
from incrementer.config import ENV_PREFIX, Settings

INSTALL_HINT = "pip install ./clients/python (the incrementer-client distribution)"


def incr(url: str, key: str, value: int, api_key: str | None, timeout: float) -> None:
    """Send one increment and wait for its acknowledgement; click.ClickException (one line,
    exit status 1) when it is refused or not acknowledged within timeout seconds."""
    try:
        from incrementer_client import Client, Refused
    except ImportError:
        raise click.ClickException(f"incrementer incr needs the client: {INSTALL_HINT}") from None
    # The failure is said in one line below, with the last error; not once per retry too.
    logging.getLogger("incrementer_client").setLevel(logging.CRITICAL)
    # The server judges the sign of the value (--allow-negative); the client checks the rest.
    client = Client(url, api_key, allow_negative=True, retry_for=timeout, close_at_exit=None)
    try:
        try:
            client.incr(key, value)
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="KEY or VALUE") from None
        client.flush(timeout)
    except Refused as exc:
        raise click.ClickException(f"{url} refused the increment: {exc}") from None
    except TimeoutError as exc:
        raise click.ClickException(
            f"{url}: {exc}; if the server received it, it counted once"
        ) from None
    finally:
        client.close(0)


@click.command("incr")
@click.argument("key")
@click.argument("value", type=int, default=1)
@click.option(
    "--url",
    envvar=ENV_PREFIX + "URL",
    help="The server [default: http://HOST:PORT of --host and --port] [env: INCREMENTER_URL]",
)
@click.option("--api-key", envvar=ENV_PREFIX + "API_KEY", help="An API key (ik_...).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to keep retrying before giving up (exit status 1).",
)
@settings_options("host", "port")
def incr_command(
    settings: Settings, key: str, value: int, url: str | None, api_key: str | None, timeout: float
) -> None:
    """Add VALUE (default 1) to the counter KEY on a running server, exactly once: retried under
    one Idempotency-Key until acknowledged. For shell scripts and cron jobs."""
    incr(url or settings.local_url, key, value, api_key, timeout)
