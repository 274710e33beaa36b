"""Where the server is, and the failures to reach it that no retry gets past.

A URL is checked when a client is made, so a mistyped one is an error at once rather than an hour
of retries. A failed attempt is retried, unless the same request could never succeed: the
request cannot be made at all, or the server's certificate is not one this client trusts.
Those are refused for good, as a 4xx is: dropped, logged, and raised by flush() as Refused.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx


def base_url(url: str) -> str:
    """The server's URL as given (`http://host:port`, `https://host/prefix`), or a bare
    `host:port` (`localhost:3333`, `[::1]:3333`), which means plain HTTP. ValueError, naming the
    URL, for one a client cannot send to."""
    text = url.strip()
    if not text:
        raise ValueError("the server URL is empty")
    if "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ValueError(f"server URL {url!r} is not usable: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"server URL {url!r} must start with http:// or https://")
    if not parsed.host:
        raise ValueError(f"server URL {url!r} names no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"server URL {url!r}: port {parsed.port} is not between 1 and 65535")
    if parsed.query or parsed.fragment:
        raise ValueError(f"server URL {url!r} must not have a query or a fragment")
    return str(parsed).rstrip("/")


def http_options(url: str, api_key: str | None, timeout: float | None) -> dict[str, Any]:
    """What the sync and the async client give their httpx client: the checked base URL, the
    headers every request carries (the key as a Bearer token), and no redirects followed: a
    redirect is answered as a refusal, so the API key goes only to the origin it was given for
    (httpx's default, made explicit)."""
    headers = {"Content-Type": "application/json", "User-Agent": "incrementer-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {
        "base_url": base_url(url),
        "headers": headers,
        "timeout": timeout,
        "follow_redirects": False,
    }


def permanent(exc: BaseException) -> bool:
    """An attempt's failure that the same request to the same server cannot get past: a URL or
    request httpx cannot send, or a TLS certificate this client does not trust. A connection
    refused or reset, a timeout or a name that does not resolve yet may pass: retried."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.LocalProtocolError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
