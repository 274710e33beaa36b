"""Hypothesis strategies for raw byte streams: random bytes, valid requests with one thing
wrong, framing edge cases (Content-Length and Transfer-Encoding at odds, oversized parts), and
pipelined mixtures of them."""

from __future__ import annotations

from hypothesis import strategies as st

from fuzzing.harness import PREFIX
from fuzzing.oracle import FORM


def raw_request(
    method: bytes = b"POST",
    target: bytes = b"/increment",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


INCREMENT = b'{"key":"' + PREFIX.encode() + b'raw","value":1}'
JSON_HEADERS = [(b"Host", b"t"), (b"Content-Type", b"application/json")]
BASES = [
    raw_request(
        headers=[*JSON_HEADERS, (b"Content-Length", b"%d" % len(INCREMENT))], body=INCREMENT
    ),
    raw_request(
        headers=[(b"Host", b"t"), (b"Content-Type", FORM.encode()), (b"Content-Length", b"11")],
        body=b"key=k&value",
    ),
    raw_request(
        headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
        body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(INCREMENT), INCREMENT),
    ),
    raw_request(
        headers=[
            *JSON_HEADERS,
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"%d" % len(INCREMENT)),
        ],
        body=INCREMENT,
    ),
    raw_request(b"GET", b"/counters/" + PREFIX.encode() + b"raw", [(b"Host", b"t")]),
    raw_request(b"GET", b"/healthz", [(b"Host", b"t")]),
    raw_request(b"GET", b"/readyz", [(b"Host", b"t"), (b"Connection", b"close")]),
    raw_request(b"GET", b"/healthz", version=b"HTTP/1.0"),
]
HEADER_NAMES = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Expect",
    b"Connection",
    b"Upgrade",
    b"Host",
    b"Authorization",
    b"content-length",
    b"Content-Length ",
    b" Content-Length",
    b"X-\x00",
]
HEADER_VALUES = [
    b"0",
    b"5",
    b"-1",
    b"+5",
    b"0x10",
    b" 5 ",
    b"5, 5",
    b"99999999999999999999999",
    b"18446744073709551616",
    b"chunked",
    b"gzip, chunked",
    b"chunked, identity",
    b"Chunked",
    b"xchunked",
    b"100-continue",
    b"200-ok",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"websocket",
    b"h2c",
    b"Bearer x",
    b"application/json",
    b"a\x00b",
    b"a\rb",
    b"\x80\xff",
    b"",
]
header_lines = st.tuples(
    st.sampled_from(HEADER_NAMES) | st.binary(min_size=1, max_size=12),
    st.sampled_from(HEADER_VALUES) | st.binary(max_size=24),
)
CHUNK_SIZES = [
    b"zz",
    b"-1",
    b"ffffffffffffffffffff",
    b"1;ext=1",
    b"  5",
    b"5 ",
    b"",
    b"0",
    b"3",
    b"1000",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with one thing wrong."""
    data = draw(st.sampled_from(BASES))
    head, _, body = data.partition(b"\r\n\r\n")
    how = draw(st.integers(0, 6))
    if how == 0:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == 1:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if how == 2:
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == 3:
        extra = draw(st.lists(header_lines, min_size=1, max_size=4))
        lines = b"".join(b"\r\n" + name + b": " + value for name, value in extra)
        return head + lines + b"\r\n\r\n" + body
    if how == 4:
        size = draw(st.sampled_from(CHUNK_SIZES))
        chunk = draw(st.binary(max_size=12))
        tail = draw(st.sampled_from([b"\r\n0\r\n\r\n", b"\r\n", b"", b"0\r\n\r\n"]))
        return raw_request(
            headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
            body=size + b"\r\n" + chunk + tail,
        )
    if how == 5:
        method = draw(
            st.sampled_from([b"CONNECT", b"HEAD", b"OPTIONS", b"PRI", b"GET", b"G\x00T", b""])
        )
        target = draw(
            st.sampled_from(
                [b"*", b"a:443", b"http://t/healthz", b"/healthz#x", b"/%ff", b"//", b""]
            )
            | st.binary(max_size=12)
        )
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1\n", b""]))
        return raw_request(method, target, [(b"Host", b"t")], version=version)
    return data + data[: draw(st.integers(0, len(data)))]  # pipelined, the second one truncated


CL = b"Content-Length"
TE = b"Transfer-Encoding"
framing = st.sampled_from(
    [
        raw_request(headers=[*JSON_HEADERS, (CL, b"21"), (CL, b"21")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"21"), (CL, b"5")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"-1")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"99999999999999999999999")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"4097")], body=INCREMENT),
        raw_request(headers=[*JSON_HEADERS, (CL, b"5"), (TE, b"chunked")], body=b"0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"-5\r\nabc\r\n0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"fffffffffffffffff\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked")], body=b"2\r\nabcdef\r\n0\r\n\r\n"),
        raw_request(headers=[*JSON_HEADERS, (TE, b"chunked"), (TE, b"chunked")], body=b"0\r\n\r\n"),
        raw_request(b"GET", b"/" + b"a" * 3000, [(b"Host", b"t")]),
        raw_request(b"GET", b"/healthz", [(b"X-%d" % i, b"v" * 50) for i in range(60)]),
        raw_request(headers=[*JSON_HEADERS, (b"Content-Length", b"5000")], body=b"x" * 5000),
        raw_request(
            headers=[*JSON_HEADERS, (b"Transfer-Encoding", b"chunked")],
            body=b"1388\r\n" + b"x" * 5000,
        ),
    ]
)
streams = st.one_of(
    st.binary(max_size=512),
    mutated(),
    framing,
    st.lists(mutated(), min_size=2, max_size=4).map(b"".join),
)
