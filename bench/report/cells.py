"""How a figure reads in a table cell, and how rows become a markdown table, a report section or a
table in the terminal (rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

Row = list[str]


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def md_table(header: Sequence[str], body: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def md_section(title: str, header: Sequence[str], body: list[Row], text: str) -> list[str]:
    """A `###` section of the report: the table, then the paragraph that says how to read it."""
    return [f"### {title}", "", md_table(header, body), "", text, ""]


def rich_table(
    title: str,
    header: Sequence[str],
    body: list[Row],
    labels: int = 2,
    styles: Sequence[str | None] = (),
) -> Table:
    """The first `labels` columns name the row (left-aligned), the others hold figures (right);
    `styles`, when given, one per row."""
    table = Table(title=title, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < labels else "right")
    for row, style in zip(body, styles or [None] * len(body), strict=True):
        table.add_row(*row, style=style)
    return table
