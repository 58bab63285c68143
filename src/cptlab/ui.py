"""Terminal output: one rich console, progress bars and tables. Model text is always escaped."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# emoji=False: rich would turn ":smile:" in model text into an emoji, and escape() does not prevent it
# under torchrun only rank 0 talks; the other ranks' consoles are quiet
console = Console(stderr=False, highlight=False, emoji=False, quiet=os.environ.get("RANK", "0") not in ("", "0"))


def safe_text(text: str) -> str:
    """Model output for the terminal: rich markup and control/escape characters neutralised.

    Control characters (ESC, CR, BEL, bidi overrides ...) are shown as their escapes (\\x1b), so a
    completion cannot colour, move or clear the terminal; '[bold]' is escaped so rich prints it."""
    cleaned = "".join(ch if ch.isprintable() or ch == "\n" else repr(ch)[1:-1] for ch in text)
    return escape(cleaned)


@contextmanager
def progress(description: str, total: int):
    """Yields advance(n=1, **fields); a live bar on a terminal, silent elsewhere."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console, transient=True,
                   disable=not console.is_terminal)
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)

        yield advance


def eval_table(title: str, rows: dict[str, dict]) -> Table:
    table = Table(title=title)
    for col in ("domain", "greedy acc", "sampled acc", "format", "mean len"):
        table.add_column(col, justify="right" if col != "domain" else "left")
    for name, r in rows.items():
        table.add_row(name, f"{r['greedy_acc']:.1%}", "-" if r.get("sampled_acc") is None else f"{r['sampled_acc']:.1%}",
                      f"{r['format_rate']:.1%}", f"{r['mean_length']:.1f}")
    return table
