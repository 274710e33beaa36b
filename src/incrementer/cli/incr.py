"""`incrementer incr KEY [VALUE]`: one increment to a running server, through the Python client
(clients/python), so it is applied exactly once however often it has to be retried.

What cannot succeed fails at once (a URL the client cannot use, a refusal, a request that cannot
be sent); what may pass is retried until --timeout, with a line on stderr every few seconds
saying why the last attempt failed, and ends with "gave up" when the time is spent.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import click

from incrementer.cli.options import settings_options
from incrementer.config import ENV_PREFIX, Settings

if TYPE_CHECKING:
    import httpx
    from incrementer_client import Client

INSTALL_HINT = "pip install ./clients/python (the incrementer-client distribution)"
FIRST_PROGRESS = 1.0  # seconds before the first "still trying" line: a quick retry says nothing
PROGRESS_EVERY = 5.0
ATTEMPT_TIMEOUT = 10.0  # one attempt's HTTP timeout, at most (the client's default)


def incr(url: str, key: str, value: int, api_key: str | None, timeout: float) -> None:
    """Send one increment and wait for its acknowledgement; click.ClickException (one line,
    exit status 1) when it is refused, cannot be sent, or is not acknowledged within timeout
    seconds; click.BadParameter (exit 2) for a URL, key or value the client refuses."""
    try:
        from incrementer_client import Client, Refused
    except ImportError:
        raise click.ClickException(f"incrementer incr needs the client: {INSTALL_HINT}") from None
    # What the client would log per retry is said here instead, as progress lines.
    logging.getLogger("incrementer_client").setLevel(logging.CRITICAL)
    attempts = Attempts()
    try:
        # The server judges the sign of the value (--allow-negative); the client checks the rest.
        client = Client(
            url,
            api_key,
            allow_negative=True,
            retry_for=timeout,
            timeout=min(timeout, ATTEMPT_TIMEOUT),
            close_at_exit=None,
            transport=attempts.transport(),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    started = time.monotonic()
    try:
        try:
            client.incr(key, value)
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="KEY or VALUE") from None
        _wait(client, attempts, url, started + timeout)
    except Refused as exc:
        if attempts.answered:
            raise click.ClickException(f"{url} refused the increment: {exc}") from None
        raise click.ClickException(f"cannot send to {url}: {exc} (no retry gets past it)") from None
    finally:
        client.close(0)  # past the deadline: one last attempt, then what is left is dropped
    if client.stats.acknowledged:
        if attempts.failed:
            _say(f"acknowledged on attempt {attempts.count}")
        return
    raise click.ClickException(
        f"gave up after {time.monotonic() - started:.0f} s and {attempts.count} attempts: the "
        f"last one {attempts.last or 'had no answer'}; if an attempt reached the server, it "
        "counted once"
    )


def _wait(client: Client, attempts: Attempts, url: str, deadline: float) -> None:
    """Until the increment is acknowledged, refused (Refused) or the deadline passes; once a
    second has passed without an acknowledgement, and every few seconds after, a line on
    stderr says why."""
    next_line = time.monotonic() + FIRST_PROGRESS
    while (left := deadline - time.monotonic()) > 0:
        try:
            client.flush(min(left, max(0.0, next_line - time.monotonic())))
            return
        except TimeoutError:
            pass
        if attempts.failed and time.monotonic() >= next_line:
            _say(
                f"{url}: not acknowledged yet, attempt {attempts.count} {attempts.last}; "
                f"retrying for {max(0.0, deadline - time.monotonic()):.0f} s more (--timeout)"
            )
            next_line = time.monotonic() + PROGRESS_EVERY


def _say(line: str) -> None:
    click.echo(f"incrementer: {line}", err=True)


class Attempts:
    """What the client's attempts came to, as its HTTP transport sees them (the client's own
    retry loop is left as it is): how many, how many failed, and how the last one failed."""

    def __init__(self) -> None:
        self.count = 0
        self.failed = 0
        self.last = ""
        self.answered = False
        """The last failure was the server's answer (a 4xx or 5xx), not a transport error."""

    def transport(self) -> httpx.BaseTransport:
        """An httpx transport that notes each attempt sent through it here."""
        import httpx

        attempts = self

        class Watched(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                attempts.count += 1
                try:
                    response = super().handle_request(request)
                except httpx.TransportError as exc:
                    attempts.failed_with(f"failed: {_why(exc)}", answered=False)
                    raise
                if response.status_code != 202:
                    reason = f"{response.status_code} {response.reason_phrase}"
                    attempts.failed_with(f"was answered {reason}", answered=True)
                return response

        return Watched()

    def failed_with(self, why: str, answered: bool) -> None:
        self.failed += 1
        self.last = why
        self.answered = answered


def _why(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "refused" in str(exc).lower():
        text += " (is the server running there?)"
    return text


@click.command("incr")
@click.argument("key")
@click.argument("value", type=int, default=1)
@click.option(
    "--url",
    envvar=ENV_PREFIX + "URL",
    help="The server: a URL (http://HOST:PORT, https://HOST/PREFIX) or HOST:PORT [default: "
    "http://HOST:PORT of --host and --port] [env: INCREMENTER_URL]",
)
@click.option(
    "--api-key",
    envvar=ENV_PREFIX + "API_KEY",
    help="An API key (ik_...), when the server requires one. [env: INCREMENTER_API_KEY]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to keep retrying what may still pass (no answer, 5xx, 429) before giving up "
    "(exit status 1); a refusal or an unusable URL fails at once.",
)
@settings_options("host", "port", connect=True)
def incr_command(
    settings: Settings, key: str, value: int, url: str | None, api_key: str | None, timeout: float
) -> None:
    """Add VALUE (default 1) to the counter KEY on a running server, exactly once: retried under
    one Idempotency-Key until acknowledged. For shell scripts and cron jobs."""
    incr(url or settings.local_url, key, value, api_key, timeout)
