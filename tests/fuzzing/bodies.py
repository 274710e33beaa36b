"""Hypothesis strategies for POST /increment bodies: valid increments (mostly, so the totals
check has plenty to add up), broken fields, loose form integers, bad UTF-8, odd JSON, mangled
bytes; each with its natural Content-Type most of the time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus, urlencode

from hypothesis import strategies as st

from fuzzing.harness import PREFIX
from fuzzing.oracle import FORM, INT64_MAX, JSON, MAX_KEY_BYTES


class Unique:
    """Stands for a key used once, for increments near INT64_MAX that must not add up."""


UNIQUE = Unique()


KEY_CHARS = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])
POOL = [
    "a",
    "A",
    "é",
    "e\u0301",  # the same text as "é" once normalised: must stay a different key
    "😀",
    "日本語",
    "with space",
    "a/b?c&d=e+f%20g#h",
    "\u200b",
    "\ufeffbom",
    "ﬁ",
    "'; DROP TABLE counters; --",
]


@st.composite
def boundary_keys(draw: st.DrawFn) -> str:
    """Keys of exactly MAX_KEY_BYTES - 1, MAX_KEY_BYTES or MAX_KEY_BYTES + 1 UTF-8 bytes."""
    char = draw(st.sampled_from(["x", "é", "€", "😀"]))
    total = MAX_KEY_BYTES + draw(st.sampled_from([-1, 0, 1]))
    room = total - len(PREFIX.encode())
    wide = room // len(char.encode())
    return PREFIX + char * wide + "x" * (room - wide * len(char.encode()))


valid_keys = st.one_of(
    st.sampled_from(POOL).map(lambda s: PREFIX + s),
    st.text(KEY_CHARS, max_size=20).map(lambda s: PREFIX + s),
    boundary_keys(),
)
invalid_keys = st.one_of(
    st.just(""),
    st.builds(
        lambda s, c: PREFIX + s + c + s,
        st.text(KEY_CHARS, max_size=5),
        st.sampled_from(["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9f"]),
    ),
    st.text(KEY_CHARS, min_size=MAX_KEY_BYTES + 1, max_size=MAX_KEY_BYTES + 40),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
small_values = st.one_of(st.integers(1, 1000), st.integers(1, 2**32))
invalid_values = st.one_of(
    st.sampled_from([0, -1, INT64_MAX + 1, -(2**63), -(2**63) - 1, 10**30]),
    st.integers(max_value=0),
    st.integers(min_value=INT64_MAX + 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1e3, -0.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.integers(1, 100).map(str),
    st.lists(st.integers(1, 5), max_size=2),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**25, max_value=10**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class Body:
    """One POST /increment body; a `Unique` key is made unique when it is sent."""

    natural_type: str | None
    data: bytes | None = None
    fields: dict[str, object] = field(default_factory=dict)
    form: bool = False
    ascii_only: bool = True
    compact: bool = True

    def render(self, fresh_key: Iterator[str]) -> bytes:
        if self.data is not None:
            return self.data
        fields = {k: next(fresh_key) if v is UNIQUE else v for k, v in self.fields.items()}
        if self.form:
            quoting = quote_plus if self.ascii_only else quote
            return urlencode(fields, quote_via=quoting).encode()
        separators = (",", ":") if self.compact else (" , ", " : ")
        return json.dumps(fields, ensure_ascii=self.ascii_only, separators=separators).encode()


@st.composite
def increment_fields(
    draw: st.DrawFn, key: st.SearchStrategy[object], value: st.SearchStrategy[object]
) -> dict[str, object]:
    fields = {"key": draw(key), "value": draw(value)}
    if draw(st.booleans()):
        fields = dict(reversed(list(fields.items())))
    return fields


valid_fields = st.one_of(
    increment_fields(valid_keys, small_values),
    increment_fields(st.just(UNIQUE), st.integers(INT64_MAX - 2**40, INT64_MAX)),
)
broken_fields = st.one_of(
    increment_fields(invalid_keys, small_values),
    increment_fields(valid_keys, invalid_values),
    increment_fields(valid_keys, small_values).map(lambda f: {"key": f["key"]}),
    increment_fields(valid_keys, small_values).map(lambda f: {"value": f["value"]}),
    st.builds(
        lambda f, extra: {**f, "extra": extra},
        increment_fields(valid_keys, small_values),
        json_values,
    ),
)


def encoded(fields: st.SearchStrategy[dict[str, object]]) -> st.SearchStrategy[Body]:
    """Fields as a JSON body (ASCII or UTF-8, compact or spaced) or as a form body."""
    as_json = st.builds(
        lambda f, ascii_only, compact: Body(JSON, fields=f, ascii_only=ascii_only, compact=compact),
        fields,
        st.booleans(),
        st.booleans(),
    )
    as_form = st.builds(
        lambda f, plus: Body(FORM, fields=f, form=True, ascii_only=plus), fields, st.booleans()
    )
    return as_json | as_form


# Values that int() reads as numbers although the documents say no: a sign other than `-`,
# whitespace, `_` separators, digits of other scripts (Arabic-Indic, fullwidth).
LOOSE_INTEGERS = [
    "+5",
    " 5",
    "5 ",
    "\t5",
    "1_000",
    "-1_0",
    "\u0665",
    "\u0661\u0662",
    "\uff15",
    "--5",
    "-",
    "+-5",
]
form_values = st.one_of(
    st.sampled_from(LOOSE_INTEGERS),
    st.text(alphabet="0123456789-+_ \t\u0665\u0660\uff15", max_size=8),
)
loose_form_bodies = st.builds(
    lambda value, plus: Body(
        FORM, fields={"key": PREFIX + "form-value", "value": value}, form=True, ascii_only=plus
    ),
    form_values,
    st.booleans(),
)
raw_form_bodies = st.text(alphabet="keyvalu=&%+-;09aéF\x00 ", max_size=40).map(
    lambda s: Body(FORM, data=s.encode())
)
random_json_bodies = json_values.map(lambda v: Body(JSON, data=json.dumps(v).encode()))
BAD_UTF8 = [
    b"\xff",
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
]
bad_utf8_keys = st.builds(
    lambda junk, where: Body(
        JSON,
        data=b'{"key":"'
        + PREFIX.encode()[:where]
        + junk
        + PREFIX.encode()[where:]
        + b'x","value":1}',
    ),
    st.sampled_from(BAD_UTF8),
    st.integers(0, len(PREFIX)),
)
odd_json = st.sampled_from(
    [
        b'{"key":"\\ud800","value":1}',
        b'{"key":"\\udfff\\ud800","value":1}',
        b'{"key":"\\u00","value":1}',
        b'{"key":"\\x41","value":1}',
        b'{"key":"k","value":NaN}',
        b'{"key":"k","value":Infinity}',
        b'{"key":"k","value":-Infinity}',
        b'{"key":"k","value":01}',
        b'{"key":"k","value":+1}',
        b'{"key":"k","value":0x1}',
        b'{"key":"k","value":1}garbage',
        b'\xef\xbb\xbf{"key":"k","value":1}',
        b'{"key":"k","value":1,}',
        b"{'key':'k','value':1}",
        b'{"key":"k"\x00,"value":1}',
        b'{"key":"k","value":' + b"9" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
        b'{"key":' * 3000,
        b"",
        b"null",
        b'"{\\"key\\":\\"k\\",\\"value\\":1}"',
    ]
).map(lambda data: Body(JSON, data=data))


@st.composite
def mangled(draw: st.DrawFn) -> Body:
    """A valid JSON body, truncated or with one byte replaced."""
    fields = draw(increment_fields(valid_keys, small_values))
    data = bytearray(json.dumps(fields, ensure_ascii=False).encode())
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        del data[at:]
    else:
        data[at] = draw(st.integers(0, 255))
    return Body(JSON, data=bytes(data))


# Mostly valid increments, so the totals check has plenty to add up.
bodies = st.one_of(
    encoded(valid_fields),
    encoded(valid_fields),
    st.one_of(
        encoded(broken_fields),
        raw_form_bodies,
        loose_form_bodies,
        random_json_bodies,
        bad_utf8_keys,
        odd_json,
        mangled(),
        st.binary(max_size=200).map(lambda data: Body(JSON, data=data)),
    ),
)
CONTENT_TYPES = [
    None,
    "",
    JSON,
    "application/json; charset=utf-8",
    "Application/JSON",
    "  application/json  ;  x=y",
    "application/json;",
    FORM,
    "application/x-www-form-urlencoded; charset=UTF-8",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "text/plain",
    "application/jsonx",
    "application/json5",
    "multipart/form-data; boundary=x",
    "*/*",
]
content_types = st.one_of(
    st.sampled_from(CONTENT_TYPES),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)


@st.composite
def posts(draw: st.DrawFn) -> tuple[str | None, Body]:
    """A body with its natural Content-Type most of the time, any other one otherwise."""
    body = draw(bodies)
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(content_types), body
    return body.natural_type, body
