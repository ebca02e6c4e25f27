"""Rendering of a report's content: tables as Markdown, HTML and LaTeX, and a document of blocks as
Markdown or as one self-contained HTML page.

A document is a list of blocks (kind, payload): 'h1' / 'h2' / 'h3' / 'p' with a text, 'list' with a
list of texts, 'table' with a `Table`, 'figure' with (alt text, path of a PNG). Every text is plain: each
format escapes what would be markup in it (HTML tags, Markdown emphasis and tables, LaTeX commands), and
a line break in a text is a space.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

CSS = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em}"
       "td{text-align:right}thead th{background:#eee}img{max-width:100%}")


@dataclass
class Table:
    """Display cells as text; the first `row_levels` columns name the row; `bold` holds (row, column)."""

    header: list[str]
    rows: list[list[str]]
    row_levels: int = 1
    bold: set[tuple[int, int]] = field(default_factory=set)


def _one_line(text: str) -> str:
    """`text` with its line breaks as spaces."""
    return " ".join(str(text).splitlines())


def _escape_html(text: str) -> str:
    return html.escape(_one_line(text))


# Markdown's inline markup: emphasis (an underscore inside a word is none), code, tables, links,
# strikethrough, math, headings' closing marks, HTML tags and entities.
_MARKDOWN_INLINE = re.compile(r"[\\`*|\[\]~$#]|(?<![^\W_])_|_(?![^\W_])|<(?=[A-Za-z/!?])|&(?=[A-Za-z#])")
# Where a block's first characters would make it a list, a quote or a thematic break: before the '-',
# '+' or '>', or after the digits of '12. ' / '12) '.
_MARKDOWN_START = re.compile(r"^(\d{1,9}(?=[.)](?:\s|$))|(?=[-+>]))")


def _escape_markdown(text: str, block_start: bool = False) -> str:
    """Markdown that shows `text` as written; `block_start`: the text begins a block (a paragraph, a list
    item, a heading), where a leading list or quote marker would be markup too."""
    text = _MARKDOWN_INLINE.sub(lambda m: "\\" + m[0], _one_line(text))
    return _MARKDOWN_START.sub(r"\1\\", text.lstrip(), count=1) if block_start else text


def _escape_latex(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
               "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
    return "".join(special.get(c, c) for c in _one_line(text)).replace("±", r"$\pm$").replace("–", "--")


def latex(table: Table) -> str:
    """A plain tabular with booktabs rules."""
    def line(cells: list[str], row: int | None) -> str:
        return " & ".join(rf"\textbf{{{_escape_latex(c)}}}" if (row, j) in table.bold else _escape_latex(c)
                          for j, c in enumerate(cells)) + r" \\"

    spec = "l" * table.row_levels + "r" * (len(table.header) - table.row_levels)
    body = [line(cells, i) for i, cells in enumerate(table.rows)]
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(table.header, None), r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _markdown_table(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rule = ["---"] * table.row_levels + ["---:"] * (len(table.header) - table.row_levels)
    rows = [[f"**{_escape_markdown(c)}**" if (i, j) in table.bold else _escape_markdown(c)
             for j, c in enumerate(cells)] for i, cells in enumerate(table.rows)]
    return "\n".join([line([_escape_markdown(c) for c in table.header]), line(rule), *map(line, rows)])


def _html_table(table: Table) -> str:
    def cell(i: int, j: int, text: str) -> str:
        text = f"<strong>{_escape_html(text)}</strong>" if (i, j) in table.bold else _escape_html(text)
        return f'<th scope="row">{text}</th>' if j < table.row_levels else f"<td>{text}</td>"

    head = "".join(f"<th>{_escape_html(c)}</th>" for c in table.header)
    body = "".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(cells)) + "</tr>"
                   for i, cells in enumerate(table.rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown(blocks: list[tuple], base: Path) -> str:
    """The blocks as Markdown; figures link to their PNG relative to the folder `base`."""
    parts = []
    for kind, payload in blocks:
        match kind:
            case "h1" | "h2" | "h3":
                parts.append("#" * int(kind[1]) + " " + _escape_markdown(payload, block_start=True))
            case "p":
                parts.append(_escape_markdown(payload, block_start=True))
            case "list":
                parts.append("\n".join(f"- {_escape_markdown(item, block_start=True)}" for item in payload))
            case "table":
                parts.append(_markdown_table(payload))
            case "figure":
                parts.append(f"![{_escape_markdown(payload[0])}]({payload[1].relative_to(base).as_posix()})")
    return "\n\n".join(parts) + "\n"


def html_page(title: str, blocks: list[tuple]) -> str:
    """The blocks as one self-contained page: inline CSS, figures as data URIs."""
    parts = []
    for kind, payload in blocks:
        match kind:
            case "h1" | "h2" | "h3":
                parts.append(f"<{kind}>{_escape_html(payload)}</{kind}>")
            case "p":
                parts.append(f"<p>{_escape_html(payload)}</p>")
            case "list":
                parts.append("<ul>" + "".join(f"<li>{_escape_html(item)}</li>" for item in payload) + "</ul>")
            case "table":
                parts.append(_html_table(payload))
            case "figure":
                data = base64.b64encode(payload[1].read_bytes()).decode()
                parts.append(f'<figure><img alt="{_escape_html(payload[0])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{_escape_html(payload[0])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_escape_html(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
