"""Terminal output: one rich console, progress bars (or, without a terminal, a progress line every
CPTLAB_PROGRESS_SECONDS) and tables. Model text is always escaped."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
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


PROGRESS_SECONDS = 30.0
"""Without a terminal: one progress line every this many seconds (env CPTLAB_PROGRESS_SECONDS; 0: none)."""


def progress_seconds() -> float:
    """The interval of progress lines without a terminal: CPTLAB_PROGRESS_SECONDS, else PROGRESS_SECONDS."""
    raw = os.environ.get("CPTLAB_PROGRESS_SECONDS", "")
    try:
        value = float(raw) if raw.strip() else PROGRESS_SECONDS
    except ValueError:
        return PROGRESS_SECONDS
    return value if value >= 0 and value == value else PROGRESS_SECONDS


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


@contextmanager
def progress(description: str, total: int):
    """Yields advance(n=1, info=""). On a terminal: a live bar. Elsewhere (nohup, CI, a log file): one line
    'DESCRIPTION: DONE/TOTAL (P%), H:MM:SS elapsed, INFO' every progress_seconds(), from a timer thread
    (so a slow step still shows the run is alive), and a last line when the work ends, if any was
    printed; silent when the interval is 0."""
    if console.is_terminal:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"), console=console, transient=True)
        with bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str = "") -> None:
                bar.update(task, advance=n, info=info)

            yield advance
        return
    interval = progress_seconds()
    state = {"done": 0, "info": "", "lines": 0}
    start = time.monotonic()
    stop = threading.Event()

    def line() -> None:
        done = state["done"]
        share = f" ({100 * done / total:.0f}%)" if total else ""
        info = f", {state['info']}" if state["info"] else ""
        console.print(f"{description}: {done}/{total}{share}, {_clock(time.monotonic() - start)} elapsed{info}",
                      markup=False, highlight=False, soft_wrap=True)
        state["lines"] += 1

    def beat() -> None:
        while not stop.wait(interval):
            line()

    def advance(n: int = 1, info: str = "") -> None:
        state["done"] += n
        state["info"] = info

    timer = threading.Thread(target=beat, name="cptlab-progress", daemon=True) if interval > 0 else None
    if timer is not None:
        timer.start()
    try:
        yield advance
    finally:
        stop.set()
        if timer is not None:
            timer.join()
            if state["lines"]:
                line()


def eval_table(title: str, rows: dict[str, dict]) -> Table:
    table = Table(title=title)
    for col in ("domain", "greedy acc", "lenient acc", "sampled acc", "format", "mean len"):
        table.add_column(col, justify="right" if col != "domain" else "left")

    def pct(value) -> str:
        return "-" if value is None or value != value else f"{value:.1%}"

    for name, r in rows.items():
        table.add_row(name, pct(r["greedy_acc"]), pct(r.get("lenient_acc")), pct(r.get("sampled_acc")),
                      pct(r["format_rate"]), f"{r['mean_length']:.1f}")
    return table


def plain_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table of plain text (nothing in it is read as markup); the first column left, the rest right."""
    table = Table(title=safe_text(title), box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for i, col in enumerate(columns):
        table.add_column(safe_text(col), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(safe_text(c) for c in row))
    return table


def _verdict(row: dict) -> str:
    strict = "correct" if row.get("correct") else "wrong"
    lenient = "right" if row.get("lenient_correct") else "wrong"
    formed = "well-formed" if row.get("well_formed") else "malformed"
    return f"{strict} ({formed}); lenient: {lenient}"


def print_samples(domain: str, rows: list[dict], n: int) -> None:
    """The first n evaluation rows of a domain: prompt, completion, extracted answers and verdict, all
    model and prompt text printed literally (markup, HTML and control characters cannot act)."""
    for i, row in enumerate(rows[:n], start=1):
        console.rule(f"{safe_text(domain)} sample {i}/{min(n, len(rows))}")
        for label, key in (("prompt", "prompt"), ("completion", "completion")):
            console.print(f"[bold]{label}:[/bold]")
            console.print(safe_text(str(row.get(key, ""))))
        console.print(f"[bold]answer:[/bold] {safe_text(repr(row.get('answer')))}   "
                      f"[bold]lenient answer:[/bold] {safe_text(repr(row.get('lenient_answer')))}")
        reward = row.get("reward")
        console.print(f"[bold]verdict:[/bold] {_verdict(row)}"
                      + (f"   [bold]reward:[/bold] {reward:g}" if isinstance(reward, (int, float)) else ""))
        if row.get("feedback"):
            console.print("[bold]feedback:[/bold]")
            console.print(safe_text(str(row["feedback"])))


WIDE = 120
"""Terminals at least this wide get listings as one table; narrower ones one block per entry."""


def print_listing(title: str, rows: list[dict[str, str]], name: str, inline: dict[str, str],
                  fields: list[str]) -> None:
    """Entries (domains, verifiers) readable at any terminal width. Wide: one table of every column.
    Narrow: per entry its name and the short `inline` values (column -> the words put before its value)
    on one line, then each of `fields` on lines of its own, wrapped under a hanging indent; a multi-line
    value (a prompt) keeps its lines. Every value is shown literally (safe_text)."""
    if console.width >= WIDE:
        table = Table(title=title)
        for col in (name, *inline, *fields):
            table.add_column(col, overflow="fold", no_wrap=col == name)
        for r in rows:
            table.add_row(*(safe_text(r[c]) for c in (name, *inline, *fields)))
        console.print(table)
        return
    console.print(f"[bold]{safe_text(title)}[/bold]")
    for r in rows:
        console.print()
        console.print(" · ".join([f"[bold]{safe_text(r[name])}[/bold]",
                                  *(safe_text(words + r[c]) for c, words in inline.items() if r.get(c))]))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        for c in fields:
            if r.get(c):
                grid.add_row(c, safe_text(r[c]))
        console.print(Padding(grid, (0, 0, 0, 4), expand=False))
