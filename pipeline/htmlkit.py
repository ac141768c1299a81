"""Small pieces of a self-contained HTML page: escaping, tables, inline SVG charts, highlighted code.

Everything a page needs is inline (CSS, JS, SVG): the report opens with no network. Every text that comes
from a run (program code, the question, the answer, file names) passes through ``esc``.
"""
from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

STATUS_COLOURS = {"ok": "#cdeccd", "skipped": "#e6e6e6", "failed": "#f6b8b8", "not run": "#ffffff"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:16px 24px 64px}
h1{font-size:22px;margin:8px 0} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.muted{color:#667} .small{font-size:12px} code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.banner{padding:8px 12px;border-radius:6px;margin:8px 0}
.banner.failed{background:#fde2e2;border:1px solid #e99} .banner.warn{background:#fff4d6;border:1px solid #e7c766}
.banner.ok{background:#e3f4e3;border:1px solid #9c9}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;border:1px solid #0002}
.badge.ok{background:#cdeccd} .badge.failed{background:#f6b8b8} .badge.skipped{background:#e6e6e6}
.badge.warn{background:#ffe9a8}
.answer{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px;white-space:pre-wrap;overflow-wrap:anywhere}
.question{font-size:16px;font-weight:600;white-space:pre-wrap;overflow-wrap:anywhere}
a.cite{background:#e4efff;border-radius:3px;padding:0 2px;text-decoration:none}
a.cite.attributed{background:#efe4ff}
.invalid{background:#fdd;color:#900;text-decoration:line-through;border-radius:3px;padding:0 2px}
mark.unknown{background:#ffe08a;border-bottom:2px dotted #b80;padding:0 1px}
.contradicted{background:#fde2c8;color:#8a3b00;border-radius:3px;padding:0 2px}
table{border-collapse:collapse;margin:6px 0;background:#fff} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f4} table:not(.sortable) td{overflow-wrap:anywhere} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer} table.sortable th:after{content:" \\2195";color:#aaa}
.window{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;scroll-margin-top:8px}
.window:target{outline:3px solid #4a8af4}
.window .head{padding:4px 10px;border-bottom:1px solid #eee;background:#f6f8fa}
.window .hl{overflow-x:auto;margin:0} .window pre{margin:0;padding:6px 10px;font-size:12.5px;line-height:1.4}
.hl .hll{background:#fff3b0;display:block}
.linenos,.hl .linenos{color:#999;padding-right:10px;user-select:none}
.bar{position:relative;height:14px;background:#f1f1f1}
.bar span{position:absolute;top:0;height:14px}
.grid{display:flex;flex-wrap:wrap;gap:18px} .grid>div{flex:1 1 340px}
details summary{cursor:pointer;color:#345}
.facts{display:flex;flex-wrap:wrap;gap:6px 14px;margin:8px 0} .fact{white-space:nowrap}
.side{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start} .dag{flex:0 1 auto;max-width:100%;overflow-x:auto}
.waterfall{flex:1 1 700px;min-width:0}
table.timing{width:100%;table-layout:fixed} table.timing th,table.timing td{overflow-wrap:anywhere}
table.timing th:nth-child(1){width:130px} table.timing th:nth-child(2),table.timing th:nth-child(5){width:64px}
table.timing th:nth-child(3){width:76px} table.timing th:nth-child(6){width:18%} table.timing th:nth-child(7){width:120px}
table.sortable td.job-answer{min-width:260px;max-width:420px;white-space:normal;overflow-wrap:anywhere}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
        return dir * x.localeCompare(y);
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any) -> str:
    """A short text for a value in a table cell."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "–"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if len(value) <= 12 else f"{len(value)} items"
    return str(value)


def page(title: str, body: str, script: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}{code_css()}</style></head>"
            f"<body><main>{body}</main>" + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "", raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then they are HTML made by the caller)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = value if raw and isinstance(value, str) else esc(fmt(value))
            data = f' data-v="{esc(value)}"' if numeric else ""
            cls_attr = ' class="num"' if numeric else ""
            cells.append(f"<td{cls_attr}{data}>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=\"{cls}\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(items: Iterable[tuple[str, Any]]) -> str:
    rows = [(k, v) for k, v in items]
    if not rows:
        return "<p class=\"muted\">(none)</p>"
    return table(["key", "value"], rows)


def bar_chart(labels: list[str], values: list[float | None], title: str, width: int = 520) -> str:
    """Horizontal bars as inline SVG; says so when every value is the same (a flat plot shows nothing)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    note = ""
    if not numbers:
        return f"<div><h3>{esc(title)}</h3><p class=\"muted\">no numeric values</p></div>"
    if len(numbers) == len(values) > 1 and len(set(numbers)) == 1:
        note = f"<p class=\"small muted\">all {len(numbers)} values are equal ({esc(fmt(numbers[0]))})</p>"
    top = max(max(numbers), 0.0)
    low = min(min(numbers), 0.0)
    span = (top - low) or 1.0
    row_h, label_w, pad = 18, 170, 60
    plot_w = width - label_w - pad
    zero = label_w + (0 - low) / span * plot_w
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(labels) + 8}" '
             f'role="img" aria-label="{esc(title)}">']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 4 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" font-size="11" text-anchor="end">{esc(label[:28])}</text>')
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            x0 = min(zero, label_w + (value - low) / span * plot_w)
            w = max(1.0, abs(value) / span * plot_w)
            parts.append(f'<rect x="{x0:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" fill="#5b8def">'
                         f'<title>{esc(label)}: {esc(fmt(value))}</title></rect>')
            parts.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 12}" font-size="11">{esc(fmt(value))}</text>')
        else:
            parts.append(f'<text x="{label_w + 4}" y="{y + 12}" font-size="11" fill="#999">n/a</text>')
    parts.append("</svg>")
    return f"<div><h3>{esc(title)}</h3>{note}{''.join(parts)}</div>"


def heatmap(rows: list[str], columns: int, values: list[list[float]], title: str) -> str:
    """Rows x columns of non-negative values as coloured cells (delta norm per target and layer)."""
    finite = [v for row in values for v in row if isinstance(v, (int, float)) and math.isfinite(v)]
    top = max(finite) if finite else 1.0
    cell, label_w = 12, 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + cell * columns + 10}" '
             f'height="{cell * len(rows) + 20}" role="img" aria-label="{esc(title)}">']
    for r, (name, row) in enumerate(zip(rows, values)):
        parts.append(f'<text x="{label_w - 4}" y="{r * cell + 10}" font-size="10" text-anchor="end">{esc(name)}</text>')
        for c, value in enumerate(row):
            level = (value / top) if top and isinstance(value, (int, float)) and math.isfinite(value) else 0
            colour = f"rgb({255 - int(170 * level)},{255 - int(120 * level)},255)"
            parts.append(f'<rect x="{label_w + c * cell}" y="{r * cell}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{colour}"><title>{esc(name)} layer {c}: {esc(fmt(value))}</title></rect>')
    parts.append(f'<text x="{label_w}" y="{cell * len(rows) + 14}" font-size="10">layer 0 … {columns - 1}</text></svg>')
    return f"<div><h3>{esc(title)}</h3>{''.join(parts)}</div>"


def dag_svg(nodes: list[str], edges: list[tuple[str, str]], status: dict[str, str], tips: dict[str, str]) -> str:
    """The graph as it ran: one row per topological generation, nodes coloured by status."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from((a, b) for a, b in edges if a in graph and b in graph)
    try:
        layers = [sorted(layer, key=nodes.index) for layer in nx.topological_generations(graph)]
    except nx.NetworkXUnfeasible:  # a cycle cannot have run; draw the nodes in trace order
        layers = [[n] for n in nodes]
    box_w, box_h, gap_x, gap_y = 118, 26, 14, 22
    width = max(len(layer) for layer in layers) * (box_w + gap_x) + gap_x if layers else 100
    pos = {}
    for row, layer in enumerate(layers):
        offset = (width - len(layer) * (box_w + gap_x) + gap_x) / 2
        for col, name in enumerate(layer):
            pos[name] = (offset + col * (box_w + gap_x), 8 + row * (box_h + gap_y))
    height = 16 + len(layers) * (box_h + gap_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" role="img" '
             f'aria-label="pipeline graph">']
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        x1, y1, x2, y2 = xa + box_w / 2, ya + box_h, xb + box_w / 2, yb
        parts.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + 14:.0f} {x2:.0f},{y2 - 14:.0f} {x2:.0f},{y2:.0f}" '
                     f'fill="none" stroke="#99a" stroke-width="1"/>')
    for name in nodes:
        x, y = pos[name]
        state = status.get(name, "not run")
        stroke = "#c00" if state == "failed" else "#778"
        parts.append(f'<g class="node" data-node="{esc(name)}" data-status="{esc(state)}">'
                     f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="5" '
                     f'fill="{STATUS_COLOURS.get(state, "#fff")}" stroke="{stroke}" '
                     f'stroke-width="{2 if state == "failed" else 1}"><title>{esc(tips.get(name, state))}</title></rect>'
                     f'<text x="{x + box_w / 2:.0f}" y="{y + 17:.0f}" font-size="11" text-anchor="middle">'
                     f'{esc(name[:17])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def code_css() -> str:
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(style="default").get_style_defs(".hl")


def highlight(path: str, lines: list[str], first: int, marked: Iterable[int] = ()) -> str:
    """Program lines, syntax-highlighted (pygments, by file name), numbered from ``first``, ``marked``
    (absolute line numbers) shaded. Pygments escapes the text: program code never becomes markup."""
    from pygments import highlight as render
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import TextLexer, get_lexer_for_filename
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False, ensurenl=False)
    relative = sorted(n - first + 1 for n in marked if first <= n < first + len(lines))
    formatter = HtmlFormatter(cssclass="hl", linenos="inline", linenostart=first, hl_lines=relative, wrapcode=True)
    return render("\n".join(lines) + "\n", lexer, formatter)
