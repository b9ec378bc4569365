"""A self-contained HTML report: sections of text, figures and tables of numbers with 95% CIs.

``write_report`` writes into ``out_dir``:

* ``index.html``: one file that renders with no network and no JavaScript: CSS inline, every
  figure embedded as a base64 ``data:`` URI (and linked to its PNG);
* each figure's PNG next to it;
* ``results.json``: every number in the page (the tables, the summary lines, and the caller's
  ``results`` dict), so nothing has to be scraped back out of the HTML.

Every piece of text is escaped with ``html.escape``; captions and cells are plain text, never
markup.

Example:
    >>> png = plots.bar_chart_ci(tmp / "acc.png", {"MAML": (0.91, 0.01)}, ylabel="accuracy", title="5-way")
    >>> sec = Section("Accuracy", "Meta-test accuracy over 600 episodes.", [Figure(png, "Final accuracy")],
    ...               [Table("Accuracy", ["method", "accuracy"], [["MAML", Estimate(0.91, 0.01, 600)]])])
    >>> write_report(tmp / "report", "MAML on Omniglot", ["MAML: 0.910 ± 0.010"], [sec], {"seed": 0})
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamlab.errors import MamlabError
from mamlab.stats import Estimate, Median

__all__ = ["Figure", "Table", "Section", "Cell", "format_value", "write_report"]

Cell = str | int | float | Estimate | Median | tuple[float, float] | None
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Figure:
    """A PNG figure on disk with its caption (``alt`` text defaults to the caption)."""

    path: str | Path
    caption: str
    alt: str = ""


@dataclass(frozen=True)
class Table:
    """A table of numbers: a cell is text, a number, an ``Estimate``, a ``Median`` or a ``(mean, ci)`` pair.

    Estimates and pairs print as ``"0.123 ± 0.004"``, Medians as ``"0.120 [0.101, 0.150]"``, with
    ``digits`` decimals.
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    note: str = ""
    digits: int = 3


@dataclass(frozen=True)
class Section:
    """A titled part of the report: explanatory paragraphs, then figures, then tables."""

    title: str
    text: str | Sequence[str] = ()
    figures: Sequence[Figure] = field(default_factory=tuple)
    tables: Sequence[Table] = field(default_factory=tuple)


# ---------------------------------------------------------------------- values
def _is_pair(value: object) -> bool:
    return (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _number(value: float, digits: int) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("∞" if value > 0 else "−∞")
    if value != 0 and not 10 ** (-digits) <= abs(value) < 1e6:
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}f}"


def format_value(value: Cell, digits: int = 3) -> str:
    """A cell as text: ``Estimate``/``(mean, ci)`` → ``"0.123 ± 0.004"``, floats with ``digits`` decimals.

    Very small or large floats switch to scientific notation; ``None`` and NaN print ``"n/a"``.
    """
    if isinstance(value, Estimate):
        value = (value.mean, value.ci)
    if isinstance(value, Median):
        return (f"{_number(value.median, digits)} [{_number(value.low, digits)}, "
                f"{_number(value.high, digits)}]")
    if _is_pair(value):
        mean, ci = value  # type: ignore[misc]
        return f"{_number(float(mean), digits)} ± {_number(float(ci), digits)}"
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return _number(value, digits)
    if isinstance(value, str):
        return value
    raise MamlabError(f"a table cell must be text, a number, an Estimate or a (mean, ci) pair, got {value!r}")


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data: Estimates as dicts, tensors/arrays as lists, NaN/inf as None."""
    if isinstance(value, (Estimate, Median)):
        return _jsonable(value.to_dict(), where)
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist() if not isinstance(value, torch.Tensor) else value.detach().cpu().tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    raise MamlabError(f"{where} is not JSON-serializable: {type(value).__name__}; use numbers, text, "
                      "lists, dicts or Estimates")


def _cell_json(value: Cell) -> Any:
    if _is_pair(value):
        mean, ci = value  # type: ignore[misc]
        return _jsonable({"mean": float(mean), "ci": float(ci)}, "cell")
    return _jsonable(value, "cell")


# ---------------------------------------------------------------------- validation
def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise MamlabError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _paragraphs(section: Section) -> list[str]:
    text = section.text
    if isinstance(text, str):
        text = [text] if text else []
    return [_check_text(f"section {section.title!r} text", t) for t in text]


def _check_table(table: Table, where: str) -> None:
    if not isinstance(table, Table):
        raise MamlabError(f"{where} must be a mamlab.report.Table, got {type(table).__name__}")
    _check_text(f"{where} title", table.title)
    if isinstance(table.digits, bool) or not isinstance(table.digits, int) or not 0 <= table.digits <= 12:
        raise MamlabError(f"{where} digits must be an integer in [0, 12], got {table.digits!r}")
    ncol = len(table.columns)
    if ncol == 0:
        raise MamlabError(f"{where} {table.title!r} has no columns; give at least one column name")
    for i, row in enumerate(table.rows):
        if isinstance(row, (str, bytes)) or len(row) != ncol:
            raise MamlabError(f"{where} {table.title!r} row {i} has {len(row)} cells; expected {ncol} "
                              f"(columns {list(table.columns)})")
        for cell in row:
            format_value(cell, table.digits)


def _read_png(fig: Figure, where: str) -> bytes:
    if not isinstance(fig, Figure):
        raise MamlabError(f"{where} must be a mamlab.report.Figure, got {type(fig).__name__}")
    path = Path(fig.path)
    if not path.is_file():
        raise MamlabError(f"{where} file {str(path)!r} does not exist; give the path of a saved PNG")
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise MamlabError(f"{where} file {str(path)!r} is not a PNG; only PNG figures are embedded")
    return data


# ---------------------------------------------------------------------- page
_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --accent: #0b5cad; --bg-alt: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 16px/1.6 -apple-system, "Segoe UI", "Helvetica Neue", Helvetica, Arial, "DejaVu Sans", sans-serif; }
main { max-width: 880px; margin: 0 auto; padding: 2.5rem 1.5rem 4rem; }
header { border-bottom: 2px solid var(--line); margin-bottom: 2rem; padding-bottom: 1rem; }
h1 { font-size: 2rem; line-height: 1.25; margin: 0 0 0.75rem; }
h2 { font-size: 1.4rem; margin: 2.75rem 0 0.75rem; padding-bottom: 0.3rem;
  border-bottom: 1px solid var(--line); }
p { margin: 0 0 1rem; }
.summary { background: var(--bg-alt); border-left: 4px solid var(--accent); padding: 0.75rem 1.25rem;
  margin: 0 0 1rem; border-radius: 0 6px 6px 0; }
.summary ul { margin: 0; padding-left: 1.2rem; }
nav ol { margin: 0.25rem 0 0; padding-left: 1.4rem; color: var(--muted); }
nav a, a { color: var(--accent); text-decoration: none; }
nav a:hover, a:hover { text-decoration: underline; }
figure { margin: 1.5rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 0.9rem; margin-top: 0.4rem; }
.label { font-weight: 600; color: var(--fg); }
.table-wrap { overflow-x: auto; margin: 1.5rem 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.95rem; }
caption { caption-side: top; text-align: left; color: var(--muted); font-size: 0.9rem;
  padding-bottom: 0.4rem; }
th, td { padding: 0.45rem 0.75rem; border-bottom: 1px solid var(--line); text-align: left; }
th { background: var(--bg-alt); font-weight: 600; border-bottom: 2px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: #fafbfc; }
.note { color: var(--muted); font-size: 0.85rem; margin-top: 0.4rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: 0.85rem; border-top: 1px solid var(--line);
  padding-top: 1rem; }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _is_numeric(cell: Cell) -> bool:
    return isinstance(cell, (int, float, Estimate, Median)) and not isinstance(cell, bool) or _is_pair(cell)


def _table_html(table: Table, number: int) -> str:
    numeric_cols = [bool(table.rows) and all(_is_numeric(r[j]) or r[j] is None for r in table.rows)
                    for j in range(len(table.columns))]
    num = ' class="num"'
    head = "".join(f'<th scope="col"{num if numeric_cols[j] else ""}>{_e(c)}</th>'
                   for j, c in enumerate(table.columns))
    body = []
    for row in table.rows:
        cells = "".join(f'<td{num if numeric_cols[j] or _is_numeric(c) else ""}>'
                        f"{_e(format_value(c, table.digits))}</td>" for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    return (f'<div class="table-wrap"><table><caption><span class="label">Table {number}.</span> '
            f"{_e(table.title)}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table>{note}</div>")


def _figure_html(fig: Figure, data: bytes, file_name: str, number: int) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = fig.alt or fig.caption
    return (f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption><span class="label">Figure {number}.'
            f"</span> {_e(fig.caption)} "
            f'(<a href="{_e(file_name)}" download>PNG</a>)</figcaption></figure>')


def _place_png(src: Path, data: bytes, out_dir: Path, used: set[str]) -> str:
    """Put the PNG in ``out_dir`` (unless it is there already); return its file name there."""
    if src.resolve().parent == out_dir.resolve() and src.name not in used:
        used.add(src.name)
        return src.name
    stem, name, i = src.stem, src.name, 2
    while name in used or ((out_dir / name).exists() and (out_dir / name).read_bytes() != data):
        name, i = f"{stem}-{i}.png", i + 1
    used.add(name)
    if not (out_dir / name).exists():
        shutil.copyfile(src, out_dir / name)
    return name


def write_report(out_dir: str | Path, title: str, summary_lines: Sequence[str], sections: Sequence[Section],
                 results: Mapping[str, Any] | None = None) -> Path:
    """Write ``index.html``, the figures' PNGs and ``results.json`` into ``out_dir``.

    Args:
        out_dir: the report's folder (created if needed).
        title: the page title.
        summary_lines: the key findings, one short line each, shown first as a list.
        sections: the body, in order.
        results: any further numbers to keep in ``results.json`` (JSON data, ``Estimate``s,
            tensors and arrays; NaN/inf become ``null``).

    Returns:
        The path of ``index.html``.
    """
    _check_text("title", title)
    if isinstance(summary_lines, str) or not all(isinstance(s, str) for s in summary_lines):
        raise MamlabError("summary_lines must be a list of strings (one line each), "
                          f"got {type(summary_lines).__name__}")
    if isinstance(sections, Section) or not all(isinstance(s, Section) for s in sections):
        kinds = [type(s).__name__ for s in sections] if isinstance(sections, (list, tuple)) else sections
        raise MamlabError(f"sections must be a list of mamlab.report.Section, got {kinds!r}")
    if results is not None and not isinstance(results, Mapping):
        raise MamlabError(f"results must be a dict or None, got {type(results).__name__}")
    results_json = _jsonable(dict(results or {}), "results")

    # Validate everything before writing anything.
    pngs: list[list[bytes]] = []
    for s, sec in enumerate(sections):
        _check_text(f"section {s} title", sec.title)
        _paragraphs(sec)
        pngs.append([_read_png(f, f"section {sec.title!r} figure {k}") for k, f in enumerate(sec.figures)])
        for k, t in enumerate(sec.tables):
            _check_table(t, f"section {sec.title!r} table {k}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    slugs: set[str] = set()
    fig_no = table_no = 0
    body: list[str] = []
    toc: list[str] = []
    sections_json: list[dict[str, Any]] = []
    for sec, datas in zip(sections, pngs, strict=True):
        anchor = _slug(sec.title, slugs)
        toc.append(f'<li><a href="#{anchor}">{_e(sec.title)}</a></li>')
        parts = [f'<section id="{anchor}"><h2>{_e(sec.title)}</h2>']
        parts += [f"<p>{_e(p)}</p>" for p in _paragraphs(sec)]
        figs_json, tables_json = [], []
        for fig, data in zip(sec.figures, datas, strict=True):
            fig_no += 1
            name = _place_png(Path(fig.path), data, out, used)
            parts.append(_figure_html(fig, data, name, fig_no))
            figs_json.append({"number": fig_no, "file": name, "caption": fig.caption})
        for table in sec.tables:
            table_no += 1
            parts.append(_table_html(table, table_no))
            tables_json.append({"number": table_no, "title": table.title, "columns": list(table.columns),
                                "rows": [[_cell_json(c) for c in row] for row in table.rows],
                                "note": table.note})
        parts.append("</section>")
        body.append("".join(parts))
        sections_json.append({"title": sec.title, "anchor": anchor, "text": _paragraphs(sec),
                              "figures": figs_json, "tables": tables_json})

    summary = ("<div class=\"summary\"><ul>" + "".join(f"<li>{_e(s)}</li>" for s in summary_lines)
               + "</ul></div>") if summary_lines else ""
    nav = f"<nav><strong>Contents</strong><ol>{''.join(toc)}</ol></nav>" if len(toc) > 1 else ""
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{_e(title)}</h1>{summary}{nav}</header>\n"
        + "\n".join(body)
        + "\n<footer>Generated by mamlab. Intervals are 95% confidence intervals (mean ± half-width); "
        "every number on this page is also in <a href=\"results.json\">results.json</a>.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )
    payload = {"title": title, "summary": list(summary_lines), "sections": sections_json,
               "results": results_json}
    text = json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False)
    (out / "results.json").write_text(text + "\n", encoding="utf-8")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
