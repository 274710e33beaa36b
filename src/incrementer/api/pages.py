"""The documents the service serves as they are: the live status page (GET /status, one
self-contained HTML file, status.html), the OpenAPI document (GET /openapi.json), the Prometheus
text (GET /metrics) and the liveness answer (GET /healthz).

The status page holds no figures. Its script fetches /metrics and /readyz once a second (relative URLs,
so it works under a reverse proxy's path prefix too) and draws them, so the HTML can be public
while /metrics stays the one protected source: with API keys on, the page asks for a key once and
keeps it in the tab's sessionStorage, sending it as `Authorization: Bearer` with its fetches.

A Content-Security-Policy lets the page load nothing but itself: its one inline script and one
inline style, allowed by their SHA-256, and fetches to its own origin. A copy of the page that
someone edited to pull a script from elsewhere, or an injected element, would not run.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from incrementer.api.routes import JSON, ok
from incrementer.http import HttpConnection, responses
from incrementer.metrics import Metrics

ELEMENT = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("script", "style")}


@dataclass(frozen=True)
class StatusPage:
    body: bytes
    headers: bytes  # response header lines, each ending in CRLF
    content_type: bytes = b"text/html; charset=utf-8"

    @classmethod
    def load(cls) -> StatusPage:
        html = resources.files("incrementer.api").joinpath("status.html").read_text("utf-8")
        policy = content_security_policy(html)
        headers = (
            f"Content-Security-Policy: {policy}\r\n"
            "Cache-Control: no-cache\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Referrer-Policy: no-referrer\r\n"
        )
        return cls(html.encode("utf-8"), headers.encode("ascii"))


def content_security_policy(html: str) -> str:
    """Nothing from anywhere, except the page's own script and style (by hash) and fetches to
    its origin. `frame-ancestors 'none'`: no other site may frame the page's key form."""
    sources = {}
    for tag, pattern in ELEMENT.items():
        found = pattern.findall(html)
        if len(found) != 1:
            raise ValueError(f"status.html must hold exactly one <{tag}>, found {len(found)}")
        digest = base64.b64encode(hashlib.sha256(found[0].encode("utf-8")).digest()).decode()
        sources[tag] = f"'sha256-{digest}'"
    return (
        f"default-src 'none'; script-src {sources['script']}; style-src {sources['style']}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class Pages:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.openapi = resources.files("incrementer.api").joinpath("openapi.json").read_bytes()
        self.status_page = StatusPage.load()

    def healthz(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        return ok(self.metrics, conn, "healthz", {"status": "ok"}, keep_alive)

    def prometheus(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("metrics", 200)
        return responses.build(
            conn.clock,
            200,
            self.metrics.render(),
            b"text/plain; version=0.0.4; charset=utf-8",
            not keep_alive,
        )

    def status(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("status", 200)
        page = self.status_page
        return responses.build(
            conn.clock, 200, page.body, page.content_type, not keep_alive, page.headers
        )

    def document(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("openapi", 200)
        return responses.build(conn.clock, 200, self.openapi, JSON, not keep_alive)
