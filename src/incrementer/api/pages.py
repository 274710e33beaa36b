"""GET /status: the live status page, one self-contained HTML file (status.html), served as is.

The page holds no figures. Its script fetches /metrics and /readyz once a second (relative URLs,
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
