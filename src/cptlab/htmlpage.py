"""The HTML pieces report.html and compare.html share: the page and its CSS, tables, figures, folds,
and the escaping every model-, task- or config-derived string goes through.

Pages are single self-contained files, readable offline: figures are PNG data URIs (plots.py), there
is no JavaScript and no external resource. `esc` spells out control characters before escaping, so a
completion holding `<script>` or a terminal escape shows as text.
"""

from __future__ import annotations

import html
import math
import re

from .plots import finite

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
MISSING = '<span class="muted">–</span>'
NOT_EVALUATED = '<span class="muted">not evaluated</span>'

CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2329;background:#f4f5f7;margin:0}
main{max-width:1080px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:24px;margin:0 0 2px}h2{font-size:19px;margin:28px 0 8px;padding-bottom:4px;border-bottom:2px solid #dde1e6}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6670;margin:0 0 8px;font-size:14px}
.card{background:#fff;border-radius:8px;padding:12px 18px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:8px 0}
.headline ul{margin:0;padding-left:20px}.headline li{margin:2px 0;font-size:15px}
.note{color:#5b6670;font-size:13px;margin:4px 0 8px}
.banner{border-radius:8px;padding:10px 16px;margin:10px 0;font-weight:500}
.fault{background:#fdecea;border:1px solid #f5c2bd;color:#8a1c12}.warn{background:#fff6e0;border:1px solid #f1d592;color:#7a5400}
img{max-width:100%;height:auto;display:block;margin:6px auto;border-radius:6px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0;background:#fff}
th,td{padding:5px 10px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
th{background:#f0f2f4;font-weight:600}.n{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37;font-weight:600}.neg{color:#c62828;font-weight:600}.zero,.muted{color:#8a949e}
table.samples{width:100%}.samples td{font-size:12.5px}
.samples pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;max-height:9em;overflow:auto}
.ok{color:#1a7f37;font-weight:700}.bad{color:#c62828;font-weight:700}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
summary{cursor:pointer;font-weight:600;margin:8px 0 4px}pre.config{background:#fff;padding:10px;border-radius:6px;font-size:12px;overflow:auto}
details.fold{background:#fff;border-radius:8px;padding:4px 16px;margin:8px 0;box-shadow:0 1px 3px rgba(0,0,0,.06)}
details.fold>summary{font-size:16px}details.fold>summary .muted{font-weight:400;font-size:13px}
"""


def esc(value) -> str:
    """Text for HTML: control characters spelled out (ESC shows as \\x1b), then html.escape."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        str(value))
    return html.escape(text, quote=True)


def pct(value) -> str:
    """A fraction as a percentage, or a muted dash."""
    x = finite(value)
    return MISSING if math.isnan(x) else f"{100 * x:.1f}%"


def pts(value, lower_is_better: bool = False) -> str:
    """A difference of accuracies in signed percentage points, green when good and red when bad."""
    x = finite(value)
    if math.isnan(x):
        return MISSING
    good = -x if lower_is_better else x
    cls = "pos" if good > 0.0005 else "neg" if good < -0.0005 else "zero"
    return f'<span class="{cls}">{100 * x:+.1f}</span>'


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{esc(title)}</title><style>{CSS}</style>'
            f'</head><body><main>\n' + "\n".join(body) + "\n</main></body></html>\n")


def table(head: list[str], rows: list[list[str]], numeric_from: int | None = 1, cls: str = "") -> str:
    """head is plain text (escaped here); cells are HTML already; columns from numeric_from align right."""
    def c(i: int) -> str:
        return ' class="n"' if numeric_from is not None and i >= numeric_from else ""

    th = "".join(f"<th{c(i)}>{esc(h)}</th>" for i, h in enumerate(head))
    trs = "".join("<tr>" + "".join(f"<td{c(i)}>{x}</td>" for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def img(uri: str, alt: str, element_id: str = "", hover: str = "") -> str:
    """An embedded figure; `hover` is shown as the browser's tooltip (e.g. the counts behind a rate)."""
    ident = f' id="{esc(element_id)}"' if element_id else ""
    title = f' title="{esc(hover)}"' if hover else ""
    return f'<img{ident} src="{uri}" alt="{esc(alt)}"{title}>'


def fold(title: str, meaning: str, body: list[str], element_id: str = "") -> list[str]:
    """A section folded away under <details>: its title and a one-line meaning show when closed."""
    if not body:
        return []
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return [f'<details class="fold"{ident}><summary>{esc(title)} <span class="muted">— {esc(meaning)}</span>'
            f"</summary>", *body, "</details>"]
