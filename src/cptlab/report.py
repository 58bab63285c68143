"""report.html for one run: the story first, everything else folded away.

The first screen holds what a newcomer needs: headline sentences saying what each stage changed on its
own domain and what it cost elsewhere, each with a 95% interval from the per-prompt records (or
"within noise"), and the accuracy matrix. Then the gain-versus-cost bars per stage and the one drift
and the one artifact curve that matter (weights moved from the base; malformed answers, with counts).
Every other section (accuracy during training, forgetting tables, training curves, the self-teacher,
all drift, artifact and general-ability panels, weight geometry, lenient accuracy, samples, config) is
under a <details> fold with its one-line meaning.

Everything comes from the run directory (metrics.jsonl, evals/, samples/, config.yaml), so a report can
be rebuilt for any run, finished or not. compare.html for several runs is compare_page.py.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import numpy as np

from . import labels, plots
from . import report_details as details
from .analysis import per_prompt
from .analysis.changes import Change, StageStory, retained, stage_stories
from .htmlpage import esc, fold, img, page
from .labels import label
from .plots import finite
from .runview import Run, load_run, numbers
from .store import atomic_write_text
from .metric_names import DRIFT, EVAL, FAULT, GREEDY_ACC, LENIENT_ACC, RUN_END

DRIFT_CURVE = "param/rel_l2_base"  # the one drift curve on the first page
ARTIFACT_CURVE = "artifacts/malformed_rate"  # the one artifact curve on the first page
COLOURS = {"own": "#1f77b4", "earlier": "#d62728", "others": "#8c8c8c"}


def _points(c: Change) -> str:
    return f"{100 * c.diff:+.1f}"


def change_html(c: Change, unit: str = " points") -> str:
    """'+18.0 points (95%: +13.1 to +23.0)', coloured when the interval excludes zero, else 'within noise'."""
    if not c.has_interval:
        return f"{_points(c)}{unit} (no per-prompt records: no interval)"
    interval = f"95%: {100 * c.low:+.1f} to {100 * c.high:+.1f}"
    if c.beyond_noise:
        return f'<span class="{"pos" if c.diff > 0 else "neg"}">{_points(c)}{unit}</span> ({interval})'
    return f'{_points(c)}{unit} <span class="muted">(within noise, {interval})</span>'


def _stage_sentence(run: Run, st: StageStory) -> str:
    head = f"<b>Stage {st.stage} · {esc(run.stage(st.stage)['method'])} on {esc(st.domain)}</b>: "
    if st.own is None:
        text = head + f"{esc(st.domain)} not evaluated"
    else:
        text = head + (f"{esc(st.domain)} {100 * st.own.before:.0f}% → {100 * st.own.after:.0f}%, "
                       f"{change_html(st.own)}")
    costs = []
    if st.earlier is not None:
        names = ", ".join(st.earlier.domains)
        costs.append(f"earlier-trained {esc(names)} {change_html(st.earlier)}")
    if st.others is not None and len(st.others.domains) == 1:
        costs.append(f"the other domain, {esc(st.others.domains[0])}, {change_html(st.others)}")
    elif st.others is not None:
        costs.append(f"the {len(st.others.domains)} other domains {change_html(st.others)} on average")
        worst, drop = st.worst or ("", None)
        if drop is not None and worst in st.others.domains and drop.beyond_noise and drop.diff < 0:
            costs[-1] += f" (most: {esc(worst)} {_points(drop)})"
    return text + (". Meanwhile " + "; ".join(costs) if costs else "") + "."


def _final_sentence(run: Run, kept: list[tuple[int, str, Change]], counts: dict[int, int]) -> str:
    S = run.R.shape[0] - 1
    avg = numbers(run)["average_accuracy"]
    text = (f"<b>After {S} stage{'s' if S > 1 else ''}</b>: mean accuracy over the {len(run.domains)} domains "
            f"{100 * avg[0]:.0f}% → {100 * avg[-1]:.0f}%")
    if kept:
        text += "; since their own stage " + ", ".join(f"{esc(d)} {change_html(c)}" for _, d, c in kept)
    drift = {r["stage"]: r for r in run.events(DRIFT) if isinstance(r.get("stage"), int)}
    moved = finite(drift.get(S, {}).get(DRIFT_CURVE))
    if not math.isnan(moved):
        text += f"; weights moved {100 * moved:.2g}% from the base"
    first, last = finite(drift.get(0, {}).get(ARTIFACT_CURVE)), finite(drift.get(S, {}).get(ARTIFACT_CURVE))
    if not (math.isnan(first) or math.isnan(last)):
        text += f"; malformed answers {100 * first:.1f}% → {100 * last:.1f}%"
        if counts.get(0) and counts.get(S):
            text += f" ({round(first * counts[0])} → {round(last * counts[S])} of {counts[S]})"
    return text + "."


def _general_sentence(run: Run) -> str | None:
    """Pretrained bases: the general-ability probe after the last stage, against the base."""
    drift = [r for r in run.events(DRIFT) if isinstance(r.get("stage"), int)]
    if not drift or "general/first_line_agreement" not in drift[-1]:
        return None
    last, base = drift[-1], drift[0]
    agree, ppl0, ppl = (finite(last.get("general/first_line_agreement")), finite(base.get("general/text_ppl")),
                        finite(last.get("general/text_ppl")))
    text = (f"<b>General ability</b> (48 fixed general prompts): {100 * agree:.0f}% of answers keep the base "
            f"model's first line")
    if not (math.isnan(ppl0) or math.isnan(ppl)):
        text += f"; perplexity of a fixed English text {ppl0:.1f} → {ppl:.1f}"
    return text + "."


def _lenient_sentence(run: Run) -> str | None:
    """Where strict and lenient accuracy differ by 2+ points after the last stage: what format costs."""
    S = run.R.shape[0] - 1
    last = [r for r in run.events(EVAL) if r.get("stage") == S and r.get("final")]
    gaps = [finite(r.get(LENIENT_ACC)) - finite(r.get(GREEDY_ACC)) for r in last]
    gaps = [g for g in gaps if not math.isnan(g)]
    if not gaps or np.mean(gaps) < 0.02:
        return None
    return (f"<b>Answer format</b>: counting the right value in any format, accuracy after the last stage is "
            f"{100 * np.mean(gaps):.1f} points higher on average (lenient accuracy, under details).")


def answer_counts(run: Run) -> dict[int, int]:
    """stage -> number of evaluation answers at its stage end (the denominators of the artifact rates)."""
    counts: dict[int, int] = {}
    for r in run.events(EVAL):
        if r.get("final") and isinstance(r.get("stage"), int) and isinstance(r.get("num_prompts"), int):
            counts[r["stage"]] = counts.get(r["stage"], 0) + r["num_prompts"]
    return counts


def headline(run: Run, stories: list[StageStory], kept, counts: dict[int, int]) -> list[str]:
    if not run.R.size:
        return ["No evaluation recorded yet."]
    n = int(np.sum(~np.isnan(run.R[0])))
    prompts = {r.get("num_prompts") for r in run.events(EVAL) if r.get("stage") == 0}
    each = f", {prompts.pop()} held-out prompts each" if len(prompts) == 1 and None not in prompts else ""
    out = [f"<b>Base model</b>: mean greedy accuracy {100 * np.nanmean(run.R[0]):.0f}% over {n} "
           f"evaluated domain{'s' if n != 1 else ''}{each}."]
    out += [_stage_sentence(run, st) for st in stories]
    if not stories:
        out.append("No stage finished yet: only the base model's evaluation is available.")
    else:
        out.append(_final_sentence(run, kept, counts))
    out += [s for s in (_general_sentence(run), _lenient_sentence(run)) if s]
    return out


def _banners(run: Run) -> list[str]:
    out = [f'<div class="banner fault">Fault in stage {esc(f.get("stage", "?"))} at global step '
           f'{esc(f.get("global_step", "?"))}: {esc(f.get("reason", "unknown"))} (action: {esc(f.get("action", "?"))})'
           f'</div>' for f in run.events(FAULT)]
    if not run.events(RUN_END):
        out.append('<div class="banner warn">This run has not finished (no run_end record): the report shows '
                   'what was written so far.</div>')
    collapse = run.summary.get("collapse")
    for s, flag in enumerate(collapse if isinstance(collapse, list) else [], start=1):
        if isinstance(flag, dict) and flag:
            signals = ", ".join(map(str, flag.get("signals") or [])) or "accuracy fell"
            out.append(f'<div class="banner warn">Stage {esc(run.stage_label(s))} collapsed at step '
                       f'{esc(flag.get("step", "?"))}: {esc(flag.get("metric", "accuracy"))} '
                       f'{finite(flag.get("peak")):.2f} → {finite(flag.get("value")):.2f} ({esc(signals)})</div>')
    return out


def gain_cost_figure(run: Run, stories: list[StageStory]) -> list[str]:
    """Per stage: the change on its own domain, on the domains trained before it, and on the others."""
    if not stories:
        return []
    bars = []
    for key, name in (("own", "its own domain"), ("earlier", "domains trained at earlier stages"),
                      ("others", "all other domains (mean)")):
        changes = [getattr(st, key) for st in stories]
        if all(c is None for c in changes):
            continue
        values = [math.nan if c is None else 100 * c.diff for c in changes]
        lows = [math.nan if c is None else 100 * c.low for c in changes]
        highs = [math.nan if c is None else 100 * c.high for c in changes]
        bars.append((name, COLOURS[key], values, lows, highs))
    # two lines: side by side, three one-line labels of this length run into each other
    labels = [f"stage {st.stage}\n{run.stage(st.stage)['method']} {st.domain}" for st in stories]
    return ["<h2>What each stage gained, and what it cost</h2>",
            '<p class="note">Change of greedy accuracy over each stage, in percentage points, on the stage\'s own '
            "domain, on the domains trained at earlier stages (a drop is forgetting) and on all other domains; "
            "whiskers: 95% intervals (paired bootstrap over the same held-out prompts before and after).</p>",
            img(plots.grouped_bars(labels, bars, ylabel="change over the stage (points)", ylim=None, height=2.8),
                "gain and cost per stage", "gain-cost")]


def drift_artifact_figure(run: Run, counts: dict[int, int]) -> list[str]:
    """The weights' distance from the base and the malformed-answer rate, per stage, from zero."""
    drift, by_step = plots.drift_table(run.records)
    keys = [k for k in (DRIFT_CURVE, ARTIFACT_CURVE) if k in drift]
    if not keys or by_step:
        return []
    panels: plots.Panels = {label(k).name: {"": details.scaled(k, drift[k])} for k in keys}
    axes: plots.Axes = {label(k).name: (label(k).unit, label(k).axis_top) for k in keys}
    notes = {}
    if ARTIFACT_CURVE in keys and counts:
        x, y = drift[ARTIFACT_CURVE]
        notes[label(ARTIFACT_CURVE).name] = [f"{round(v * counts[s])}/{counts[s]}" if counts.get(s) else ""
                                             for s, v in zip(x, y)]
    figure = plots.stage_grid(panels, {s: run.stage_label(s) for s in range(len(run.plan) + 1)}, ncols=2,
                              axes=axes, notes=notes, size=(4.6, 2.4))
    text = " ".join(f"{label(k).name[0].upper() + label(k).name[1:]}: {label(k).meaning}." for k in keys)
    return ["<h2>How far the model moved</h2>",
            f'<p class="note">After each stage (0 = the base model). {esc(text)} Both axes start at zero (the '
            f"rate's axis reaches at least {labels.SHARE_AXIS_TOP:g}%, so that a handful of answers stays near the floor)"
            + ("; numbers on the points: malformed answers / all evaluation answers." if notes else ".") + "</p>",
            img(figure, "drift and artifacts per stage", "drift-artifacts")]


def story(run: Run) -> tuple[list[StageStory], list, dict[int, int]]:
    """What the headline tells: each stage's changes, the domains' retention since their own stage, and the
    evaluation answer counts per stage."""
    records = per_prompt.final_records(run.root)
    stories = stage_stories(run.R, run.domains, run.stage_domains, records) if run.R.size else []
    kept = retained(run.R, run.domains, run.stage_domains, records) if run.R.size else []
    return stories, kept, answer_counts(run)


def headline_text(run_dir: Path | str) -> list[str]:
    """The report's headline sentences as plain text (for the terminal at the end of a run)."""
    run = load_run(run_dir)
    return [html.unescape(re.sub(r"<[^>]*>", "", h)) for h in headline(run, *story(run))]


def build_report(run: Run) -> str:
    stories, kept, counts = story(run)
    stages = " → ".join(f"{esc(st['method'])} {esc(st['domain'])} ({esc(st['steps'])} steps)"
                        for st in map(run.stage, range(1, len(run.plan) + 1))) or "no stages"
    base = run.summary.get("base") if isinstance(run.summary.get("base"), dict) else {}
    facts = [f"base: {esc(base.get('source', '?'))}", f"seed {esc(run.config.get('run', {}).get('seed', '?'))}"]
    if isinstance(base.get("parameters"), (int, float)):
        facts[0] += f", {base['parameters'] / 1e6:.2f}M parameters"
    if not math.isnan(finite(run.summary.get("seconds"))):
        facts.append(f"{finite(run.summary['seconds']):.0f} s")
    body = [f"<h1>{esc(run.name)}</h1>", f'<p class="sub">{stages} · {" · ".join(facts)}</p>', *_banners(run),
            '<div class="card headline" id="headline"><ul>'
            + "".join(f"<li>{h}</li>" for h in headline(run, stories, kept, counts)) + "</ul>"
            '<p class="note">Points: percentage points of greedy accuracy on held-out prompts. 95% intervals: '
            "paired bootstrap over the same prompts before and after; within noise = the interval includes zero."
            "</p></div>"]
    if run.R.size:
        body += ['<h2 id="matrix-title">Accuracy after each stage</h2>',
                 img(plots.accuracy_heatmap(100 * run.R, [run.stage_label(s) for s in range(len(run.R))],
                                            run.domains, run.stage_domains), "accuracy matrix", "matrix"),
                 '<p class="note">Greedy accuracy (%) of the model after each stage (rows; 0 = the base) on each '
                 "evaluated domain (columns); outlined: the domain the stage trained on; –: not evaluated.</p>"]
    body += details.domain_sources(run)
    body += gain_cost_figure(run, stories)
    body += drift_artifact_figure(run, counts)
    bounds = plots.stage_bounds(run.records, run.stage_label)
    drift, by_step = plots.drift_table(run.records)
    body += ['<h2>Details</h2>']
    body += fold("Accuracy during training", "every evaluation of every domain over the training steps",
                 details.accuracy_curves(run, bounds))
    body += fold("Forgetting and transfer", "forgetting, backward and forward transfer, per stage and per domain",
                 details.forgetting_tables(run, numbers(run)) if run.R.size else [])
    body += fold("Lenient accuracy", "accuracy when the right value counts in any format",
                 details.lenient_matrix(run))
    body += fold("Training curves", "reward, KL to the base, entropy and length at every step",
                 details.curves(run, details.TRAIN_CURVES, bounds))
    from .methods import METHODS  # each method declares its own curves

    for method in METHODS.values():
        if method.report is not None:
            title, meaning, keys = method.report
            body += fold(title, meaning, details.curves(run, keys, bounds))
    for prefix, title, meaning in details.DRIFT_SECTIONS:
        body += fold(title, meaning, details.drift_section(run, prefix, title, drift, by_step, bounds, counts))
    body += fold("Weight geometry per module type", "how the weight matrices' spectra and top subspaces moved",
                 details.geometry_table(run))
    if not drift:
        body.append('<p class="note">No drift records in this run (eval.drift was off).</p>')
    body += fold("Sample responses", "a few evaluation answers after each stage, verbatim", details.samples(run))
    if (run.root / "config.yaml").is_file():
        body += fold("Resolved config", "config.yaml, every setting of this run",
                     [f'<pre class="config">{esc((run.root / "config.yaml").read_text())}</pre>'])
    return page(f"cptlab report: {run.name}", body)


def write_report(run_dir: Path | str) -> Path:
    """Write run_dir/report.html (self-contained: figures embedded, no scripts) and return its path."""
    run = load_run(run_dir)
    path = run.root / "report.html"
    atomic_write_text(path, build_report(run))
    return path
