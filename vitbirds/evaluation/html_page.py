"""One way to build a self-contained HTML page: every figure embedded as a base64 PNG, no
external resources, values escaped. The evaluation report and the monitoring report are built
with it."""

import base64
import html
import io
from collections.abc import Sequence

from matplotlib.figure import Figure

BASE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
"""


def escape(value: object) -> str:
    return html.escape(str(value))


def page(title: str, parts: Sequence[str], style: str = "") -> str:
    """A whole page: `title` as its title and first heading, then the non-empty `parts`, styled
    by BASE_STYLE plus `style`."""
    head = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{escape(title)}</title><style>{BASE_STYLE}{style}</style></head><body>\n"
        f"<h1>{escape(title)}</h1>"
    )
    return "\n".join([head, *(part for part in parts if part), "</body></html>"])


def section(key: str, heading: str, body: str) -> str:
    return f'<section id="{key}">\n<h2>{escape(heading)}</h2>\n{body}\n</section>'


def table(key: str, header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    """`<table id="KEY-table">`; numbers right-aligned; no header row when `header` is None."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table id="{key}-table">{head}{body}</table>'


def _cell(value: object) -> str:
    if isinstance(value, int | float):
        return f'<td class="num">{escape(value)}</td>'
    return f"<td>{escape(value)}</td>"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
