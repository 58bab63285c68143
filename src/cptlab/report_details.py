"""The folded sections of report.html: everything a reader may want after the story (report.py).

Each function returns the body of one section (empty when the run has nothing for it); report.py puts
each under a <details> fold with its title and one-line meaning. Figures use the plain names, units
and zero-based rate axes of labels.py; a series that is constant over the run is not drawn but
listed with its value.
"""

from __future__ import annotations

import json
import math

import numpy as np

from . import plots
from .analysis.artifacts import ANSWER_RATES
from .analysis.metrics import matrix_from_records
from .htmlpage import MISSING, NOT_EVALUATED, esc, img, pct, pts, table
from .labels import SUB_KINDS, label
from .runview import Run, latest_samples
from .plots import finite
from .metric_names import DRIFT, EVAL, GREEDY_ACC, RUN_START, TRAIN

SAMPLES_PER_STAGE = 6
TRAIN_CURVES = ("reward", "kl_to_base", "entropy", "response_length")
DRIFT_SKIP = {"num_tensors", "char_level"}  # bookkeeping fields of the drift records, not measurements
DRIFT_SECTIONS = [
    ("param", "Parameter drift", "how far the weights moved from the base model, after each stage"),
    ("response", "Response drift", "how the model's answers on probe prompts differ from the base model's"),
    ("artifacts", "Artifact rates", "formatting and repetition problems in the evaluation answers"),
    ("general", "General ability", "48 fixed general prompts (facts, instructions, completions) against the base "
     "model's own greedy answers, and the perplexity of a fixed English paragraph; stage 0 is the base itself"),
]


def constant(ys) -> bool:
    """Whether a series holds one value throughout (nothing to draw)."""
    values = [v for v in ys if not math.isnan(finite(v))]
    return bool(values) and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def scaled(key: str, xy: tuple[list, list]) -> tuple[list, list]:
    """(x, y) in the label's display unit: shares and ratios in percent."""
    x, y = xy
    return (x, [100 * v for v in y]) if label(key).in_percent else (x, list(y))


def panels_for(keys_xy: dict[str, tuple[list, list]]) -> tuple[plots.Panels, plots.Axes, list[str]]:
    """Panels (one per metric, its per-module-type lines together), their axes, and a note for each
    metric left out because it is constant. keys_xy: metric key (maybe with a /kind suffix) -> (x, y)."""
    grouped: dict[str, dict[str, tuple[list, list]]] = {}
    for key, xy in keys_xy.items():
        head, metric, sub = (key.split("/", 2) + ["", ""])[:3]
        base_key = f"{head}/{metric}" if metric else head
        grouped.setdefault(base_key, {})[SUB_KINDS.get(sub, sub) if sub else "all"] = scaled(base_key, xy)
    panels: plots.Panels = {}
    axes: plots.Axes = {}
    left_out = []
    for base_key, lines in grouped.items():
        lab = label(base_key)
        lines = {k: v for k, v in lines.items() if not constant(v[1])}
        if not lines:
            x, y = next(iter(grouped[base_key].values()))
            unit = "%" if lab.in_percent else ""
            left_out.append(f"{lab.name} = {y[0]:.4g}{unit}")
            continue
        panels[lab.name] = {"": lines["all"]} if list(lines) == ["all"] else lines
        axes[lab.name] = (lab.unit, lab.axis_top)
    return panels, axes, left_out


def constant_note(left_out: list[str]) -> list[str]:
    return [f'<p class="note">Constant over the run, not drawn: {esc("; ".join(left_out))}.</p>'] if left_out else []


def forgetting_tables(run: Run, nums: dict) -> list[str]:
    avg = nums["average_accuracy"]
    scalar = table(["", "value"], [
        ["average accuracy after the last finished stage, all domains", pct(avg[-1])],
        ["average accuracy after the last finished stage, trained domains", pct(nums["average_accuracy_trained"][-1])],
        ["mean forgetting (points; lower is better)", pts(nums["mean_forgetting"], lower_is_better=True)],
        ["mean forgetting, base row included (points)", pts(nums["mean_forgetting_incl_base"], lower_is_better=True)],
        ["backward transfer BWT (points; negative = forgetting)", pts(nums["bwt"])],
        ["forward transfer FWT (points; positive = earlier stages helped)", pts(nums["fwt"])]])
    never = [j for j in range(len(run.domains)) if np.isnan(run.R[:, j]).all()]  # trained, not in eval.domains
    stage_rows = [["0", "base", "", "", pct(avg[0]), "", ""]] + [
        [str(s), *(esc(run.stage(s)[k]) for k in ("method", "domain", "steps")), pct(avg[s]),
         NOT_EVALUATED if run.stage_domains[s - 1] in never else pts(nums["in_domain_gain"][s - 1]),
         pts(nums["ood_change"][s - 1])]
        for s in range(1, len(run.stage_domains) + 1)]
    dom_rows = []
    for j, d in enumerate(run.domains):
        col = run.R[:, j]
        trained = ", ".join(str(s) for s, k in enumerate(run.stage_domains, start=1) if k == j) or "–"
        if j in never:
            dom_rows.append([esc(d), esc(trained), *[NOT_EVALUATED] * 4])
            continue
        dom_rows.append([esc(d), esc(trained), pct(col[0]), pct(np.nanmax(col)), pct(col[-1]),
                         pts(nums["forgetting"][j], lower_is_better=True)])
    return ['<div class="card">', scalar,
            '<p class="note">Points are percentage points of greedy accuracy. Forgetting of a domain (Chaudhry et '
            'al. 2018): its best accuracy after any stage before the last minus its final one; mean forgetting '
            'averages it over the domains trained before the last stage ("base row included" also counts the base '
            "model's accuracy as a best). Average accuracy over trained domains: the domains trained up to that "
            'stage. BWT: mean change of each trained domain from right after its own stage to the end. FWT: mean '
            'change of each domain, just before its own stage, against the base model\'s accuracy on it.</p>'
            '<h3>Per stage</h3>',
            table(["stage", "method", "domain", "steps", "avg acc", "in-domain gain", "OOD change"], stage_rows, 3),
            "<h3>Per domain</h3>",
            table(["domain", "trained at stage", "base", "best", "final", "forgetting"], dom_rows, 2), "</div>"]


def accuracy_curves(run: Run, bounds) -> list[str]:
    evals = run.events(EVAL)
    acc = {d: plots.series([r for r in evals if r.get("domain") == d], GREEDY_ACC) for d in run.domains}
    acc = {d: (x, [100 * v for v in y]) for d, (x, y) in acc.items() if x}
    if not acc:
        return []
    return ['<p class="note">Greedy accuracy (%) at every evaluation (mid-stage and stage end) of each domain; '
            "dashed lines mark stage boundaries.</p>", img(plots.accuracy_over_steps(acc, bounds), "accuracy over steps")]


def lenient_matrix(run: Run) -> list[str]:
    """Lenient accuracy (the right value in any format), where it differs from strict accuracy."""
    L, domains, trained = matrix_from_records(run.records, "lenient_acc")
    if not L.size or np.isnan(L).all() or L.shape != run.R.shape or np.allclose(L, run.R, equal_nan=True):
        return []
    gap = np.nanmean(L[-1] - run.R[-1]) if not np.isnan(L[-1] - run.R[-1]).all() else math.nan
    return [f'<p class="note">Greedy accuracy (%) when the right value counts in any format (the last answer '
            f"wrapper's content or the last number), after each stage. After the last stage it is "
            f"{100 * gap:.1f} points above strict accuracy on average: what the answer format alone costs.</p>",
            img(plots.accuracy_heatmap(100 * L, [run.stage_label(s) for s in range(len(L))], domains, trained),
                "lenient accuracy matrix")]


def curves(run: Run, keys: tuple[str, ...], bounds) -> list[str]:
    """Training-record curves over global steps (plain names, units; constant ones listed)."""
    train = run.events(TRAIN)
    found = {key: plots.series(train, key) for key in keys}
    panels, axes, left_out = panels_for({k: xy for k, xy in found.items() if xy[0]})
    if not panels:
        return constant_note(left_out)
    notes = "; ".join(f"{name}: {label(k).meaning}" for k in keys if (name := label(k).name) in panels)
    return [f'<p class="note">{esc(notes)}. Faint: every step; bold: moving average within each stage.</p>',
            img(plots.curve_grid(panels, bounds, axes=axes), "training curves"), *constant_note(left_out)]


def drift_section(run: Run, prefix: str, title: str, drift: dict, by_step: bool, bounds,
                  counts: dict[int, int]) -> list[str]:
    """One prefix of the drift records (param/, response/, artifacts/, general/) as small panels."""
    part = {k: xy for k, xy in drift.items() if k.split("/")[0] == prefix and k.split("/")[1] not in DRIFT_SKIP}
    panels, axes, left_out = panels_for(part)
    if not panels:
        return constant_note(left_out)
    stage_labels = {s: run.stage_label(s) for s in range(len(run.plan) + 1)}
    notes = {}
    if prefix == "artifacts" and counts and not by_step:  # the answers behind each answer rate
        for key, xy in part.items():
            if key.split("/")[1] in ANSWER_RATES and label(key).name in panels:  # not the token ratios
                notes[label(key).name] = [f"{round(v * counts.get(s, 0))}/{counts.get(s, 0)}" if counts.get(s) else ""
                                          for s, v in zip(*xy)]
    figure = (plots.curve_grid(panels, bounds, ncols=3, axes=axes) if by_step
              else plots.stage_grid(panels, stage_labels, axes=axes, notes=notes))
    meanings = "; ".join(f"{label(k).name}: {label(k).meaning}" for k in dict.fromkeys(
        "/".join(k.split("/")[:2]) for k in part) if label(k).name in panels)
    count_note = " Numbers on the points: answers with the artifact / all evaluation answers." if notes else ""
    return [f'<p class="note">{esc(meanings)}.{count_note}</p>', img(figure, title), *constant_note(left_out)]


GEOMETRY_COLUMNS = [("spectral_shift", "spectral shift", lambda v: f"{v:.2e}"),
                    ("max_angle", "largest principal angle (°)", lambda v: f"{v:.2f}"),
                    ("principal_mask_overlap", "principal mask kept", pct),
                    ("principal_update_share", "updates in principal mask", pct)]


def geometry_table(run: Run) -> list[str]:
    """Per stage and module type, the weight-geometry numbers of the stage's last drift record."""
    last = {r["stage"]: r for r in run.events(DRIFT) if isinstance(r.get("stage"), int) and r["stage"] > 0}
    rows = []
    for s, record in sorted(last.items()):
        for kind in ("all", "attention", "mlp", "embedding", "other"):
            values = [finite(record.get(f"param/{key}" + ("" if kind == "all" else f"/{kind}")))
                      for key, _, _ in GEOMETRY_COLUMNS]
            if not all(math.isnan(v) for v in values):
                rows.append([esc(run.stage_label(s)) if kind == "all" else "", kind] +
                            [MISSING if math.isnan(v) else fmt(v) for v, (_, _, fmt) in zip(values, GEOMETRY_COLUMNS)])
    if not rows:
        return []
    return ['<p class="note">Each weight matrix W against the base W0, averaged over the matrices of a type '
            "(after “The Path Not Taken”, arXiv 2511.08567): spectral shift ||σ(W) − σ(W0)|| / ||σ(W0)||; "
            "largest principal angle between the top-k left singular subspaces (k = min(m, n) / 8); the share of "
            "W0's principal weights (top half of the rank-r reconstruction, r = min(m, n) / 64) still principal in "
            "W; the share of the most-moved half of the entries that are principal weights of W0 (random placement: "
            "50%; below it, updates avoid them).</p>",
            table(["after stage", "module type"] + [h for _, h, _ in GEOMETRY_COLUMNS], rows, 2)]


def domain_sources(run: Run) -> list[str]:
    """The data-set domains of the run (run_start's domain_info): verifier, answer format, split sizes."""
    start = next(iter(run.events(RUN_START)), {})
    info = start.get("domain_info") if isinstance(start.get("domain_info"), dict) else {}
    rows = [[esc(name), esc(i.get("verifier", "")), esc(i.get("answer_format") or "the run's"),
             esc(i.get("train", "")), esc(i.get("eval", "")), esc(i.get("duplicates", 0))]
            for name, i in info.items() if isinstance(i, dict) and i.get("kind") == "dataset"]
    if not rows:
        return []
    return ['<h2 id="domains-title">Data-set domains</h2>',
            '<p class="note">Domains read from data sets, the verifier that checks each answer, the format the '
            "answer is read in, and the questions used for training and held out for evaluation (split by a "
            "hash of the question; duplicates dropped).</p>",
            table(["domain", "verifier", "answer format", "train", "eval", "duplicates"], rows, 3, "domains")]


def samples(run: Run) -> list[str]:
    out, files = [], latest_samples(run)
    for s, (step, path) in files.items():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data = {d: [it for it in items if isinstance(it, dict)] for d, items in data.items()
                if isinstance(items, list)} if isinstance(data, dict) else {}
        per_domain = max(1, SAMPLES_PER_STAGE // max(1, len(data)))  # spread the handful over the domains
        feedback = any(it.get("feedback") for items in data.values() for it in items)  # data sets' verifiers
        rows = [[esc(d), f"<pre>{esc(it.get('question', ''))}</pre>", f"<pre>{esc(it.get('completion', ''))}</pre>",
                 '<span class="ok">✓</span>' if it.get("correct") else '<span class="bad">✗</span>',
                 "-" if "lenient_correct" not in it else "yes" if it["lenient_correct"] else "no",
                 "yes" if it.get("well_formed") else "no"]
                + ([f"<pre>{esc(it.get('feedback') or '')}</pre>"] if feedback else [])
                for d, items in data.items() for it in items[:per_domain]]
        is_open = " open" if s in (min(files), max(files)) or len(files) <= 3 else ""  # base and last stage
        out += [f"<details{is_open}><summary>after stage {esc(run.stage_label(s))} (step {step})</summary>",
                table(["domain", "question", "completion", "correct", "lenient", "well-formed"]
                      + (["verifier feedback"] if feedback else []), rows[:SAMPLES_PER_STAGE], None, "samples"),
                "</details>"]
    return ['<p class="note">A few evaluation samples from the last evaluation of each stage, verbatim (escaped; '
            "control characters spelled out). Lenient: the right value in any format.</p>", *out] if out else []
