"""compare.html: several runs side by side (accuracy matrices, forgetting and transfer, the statistics
table of analysis/compare.py, final accuracy, drift and artifacts per stage, forgetting against domain
distance). Runs whose config differs only in seed form a seed group (a study's variant).

Each run has one label, used in every table and legend of the page and in the terminal: its variant's
name (the run's name without a -s<seed> suffix), followed by "· seed N" where the variant has several
runs. Where the runs are not like for like (another base model, other domains or eval prompts:
analysis/compare.py `mismatches`) the page says so at the top.

Everything comes from the run directories (runview.py); the page shares its pieces with report.html
(htmlpage.py): self-contained, no JavaScript, every model- or config-derived string escaped.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots
from .analysis.compare import Mismatch, StatsTable
from .errors import UserError
from .htmlpage import esc, img, page, pct, pts, table
from .labels import label
from .report_details import scaled
from .runview import Run, load_run, numbers
from .store import atomic_write_text
from .metric_names import FAULT, RUN_END

_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_]?\d+$")


def seed_group_key(run: Run) -> str:
    """Equal for runs whose resolved config differs only in run.seed, run.name and run.out_dir."""
    if not run.config:
        return str(run.root.resolve())
    cfg = json.loads(json.dumps(run.config, default=str))
    for key in ("seed", "name", "out_dir"):
        (cfg.get("run") or {}).pop(key, None)
    return json.dumps(cfg, sort_keys=True)


def _final(run: Run, domain: str) -> float:
    return float(run.R[-1, run.domains.index(domain)]) if domain in run.domains and len(run.R) else math.nan


def _spread(values: list[float], signed: bool) -> str:
    """mean ± sample std, then the 95% t interval, of a seed group, in percent or in signed points."""
    from .analysis.stats import describe

    s = describe([100 * x for x in values if not math.isnan(x)])
    if not s.n:
        return '<span class="muted">–</span>'
    f = "{:+.1f}" if signed else "{:.1f}"
    if s.n == 1:
        return f.format(s.mean)
    return (f"{f.format(s.mean)} ± {s.std:.1f}<br>"
            f"<span class='muted'>95%: {f.format(s.low)} to {f.format(s.high)}</span>")


def _arms(runs: list[Run], groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """Seed groups named by their runs' name without the seed suffix (a study's variant names); two
    groups of one name are told apart by their methods, then by their first run's directory."""
    def base(members: list[int]) -> str:
        first = runs[members[0]]
        return _SEED_SUFFIX.sub("", first.name) or first.name

    names = [base(m) for m in groups.values()]
    arms: dict[str, list[int]] = {}
    for name, members in zip(names, groups.values()):
        first = runs[members[0]]
        if names.count(name) > 1:
            name = f"{name} ({'→'.join(first.methods) or 'no stages'})"
        arms[name if name not in arms else f"{name} [{first.root.name}]"] = members
    return arms


def run_labels(runs: list[Run], arms: dict[str, list[int]]) -> list[str]:
    """One label per run: its variant's name, with "· seed N" where the variant has several runs
    (and the directory where two runs of a variant share a seed)."""
    labels = [""] * len(runs)
    for arm, members in arms.items():
        for i in members:
            labels[i] = arm if len(members) == 1 else f"{arm} · seed {runs[i].config.get('run', {}).get('seed', '?')}"
    return [f"{lab} [{r.root.name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def _stats_section(stats) -> list[str]:
    """compare.html's statistics table (analysis/compare.py): one row per number and variant."""
    from .analysis.compare import cell_text, diff_kind, fmt, fmt_p, verdict_text
    from .analysis.stats import direction_word

    rows = []
    for row in stats.rows:
        for k, arm in enumerate(stats.arms):
            s, d = row.per_arm[arm], row.vs_baseline.get(arm)
            dk = diff_kind(row.kind)
            adj = row.adjusted.get(arm)
            word = direction_word((adj.low, adj.high) if adj else (d.low, d.high)) if d else ""
            cls = {"higher": "neg" if row.lower_is_better else "pos",
                   "lower": "pos" if row.lower_is_better else "neg"}.get(word, "zero")
            against = "baseline" if arm == stats.baseline else esc(
                f"{fmt(d.diff, dk, True)} [{fmt(d.low, dk, True)}, {fmt(d.high, dk, True)}]")
            rows.append([esc(row.label + (" (lower is better)" if row.lower_is_better else "")) if k == 0 else "",
                         esc(arm), esc(s.n), esc(cell_text(s, row.kind)), against,
                         esc(fmt_p(d.p_welch)) if d else "", esc(fmt_p(d.p_perm)) if d else "",
                         esc(fmt_p(row.p_holm[arm])) if d else "",
                         esc(f"[{fmt(adj.low, dk, True)}, {fmt(adj.high, dk, True)}]"
                             f" ({100 * row.holm_level[arm]:.2f}%)") if d and adj else "",
                         f'<span class="{cls}">{esc(verdict_text(row, arm))}</span>' if d else ""])
    note = ('<p class="note">Per variant (runs that differ only in seed): mean ± sample std [95% t interval] over '
            f'seeds. Against the baseline <b>{esc(stats.baseline)}</b> (<code>--baseline</code>): the difference of '
            "means with its 95% interval (Welch's t over seeds; where every run has per-prompt records of the same "
            "eval set, widened to also cover the hierarchical bootstrap over seeds and prompts), Welch's p and the "
            "exact permutation p over seeds (with 3 vs 3 seeds it cannot go below 0.10), the Holm-adjusted p over "
            f"the table's {stats.family_size} differences and the interval at the row's Holm level. Verdict rule: "
            "higher or lower only where the adjusted interval excludes zero, else inconclusive (the 95% verdict "
            "in brackets where it differs). Accuracies and rates in %, their differences and forgetting/BWT/FWT "
            "in points; KL in nats per token (≈0: an estimate below 0.0005, which sampling noise can push under "
            "zero)."
            + (f" {stats.paired_rows} accuracy rows use per-prompt records." if stats.paired_rows else
               " No per-prompt records (evals/): prompt noise is not in these intervals.") + "</p>")
    return ["<h2>Statistics over seeds</h2>", note,
            table(["number", "variant", "seeds", "mean ± std [95% interval]", "vs baseline [95% interval]",
                   "Welch p", "perm. p", "Holm p", "Holm-adjusted interval (level)", "verdict"], rows, 2)]


_COMPARE_DRIFT = ["param/rel_l2_base", "param/rel_l2_prev", "param/effective_rank", "param/spectral_shift",
                  "param/max_angle", "param/principal_mask_overlap", "param/principal_update_share",
                  "response/kl_to_base", "response/answer_changed_frac", "response/entropy", "artifacts/malformed_rate",
                  "artifacts/repetition_rate", "artifacts/distinct_2", "general/first_line_agreement",
                  "general/kl_to_base", "general/text_ppl"]
"""Per-stage drift numbers compare.html draws, one panel each (titled and scaled as labels.py says)."""


def _distance_section(runs: list[Run], labels: list[str], colours: list[str]) -> list[str]:
    """Each domain's accuracy drop over a stage against its MMD^2 to the stage's trained domain, one dot
    per (run, stage, other domain), from each run's distance.json (computed first where it is missing and
    the run's base model is there)."""
    from .analysis.distance import binned, forgetting_vs_distance, pair_means, run_distance

    memo: dict = {}  # runs on one base model share one computation
    series, pooled = [], []
    for i, run in enumerate(runs):
        try:
            distance = run_distance(run.root, memo)
        except (UserError, OSError, RuntimeError, ValueError) as e:  # one unreadable base must not cost the page
            warnings.warn(f"{run.root}: no domain distance ({e})")
            continue
        points = forgetting_vs_distance(run.R, run.domains, run.stage_domains, distance) if distance else []
        pooled += points
        if points:
            series.append((labels[i], colours[i], [p["distance"] for p in points],
                           [100 * p["forgetting"] for p in points]))
    if not series:
        return []
    return ["<h2>Forgetting against domain distance</h2>",
            '<p class="note">One dot per run, stage and untrained domain: the domain\'s greedy-accuracy drop over '
            "the stage (points; positive = forgotten) against its distance to the stage's domain, the MMD² (RBF "
            "kernel, median-heuristic bandwidth) between the two domains' held-out prompts embedded by the run's "
            "base model (mean-pooled last hidden layer; <code>cptlab distance</code>). The dots are not independent: "
            "every run and stage measures the same domain pairs. The dark line: the mean over domain pairs (each "
            "pair's mean drop over all runs and stages) in equal-count bins of distance, with the 95% t interval "
            "over the bin's pairs.</p>",
            img(plots.scatter_by_run(series, "MMD² to the stage's trained domain", "accuracy drop (points)",
                                     binned=[{**b, **{k: 100 * b[k] for k in ("mean", "low", "high")}}
                                             for b in binned(pair_means(pooled), 6)],
                                     binned_label="mean over domain pairs [95%]"),
                "forgetting against domain distance")]


@dataclass
class Comparison:
    """What `compare` wrote and found: the page, the statistics table (analysis/compare.py) and the
    ways the runs are not like for like."""

    path: Path
    stats: StatsTable
    mismatches: list[Mismatch]
    labels: list[str]


def build_compare(runs: list[Run], baseline: str | None = None) -> str:
    """compare.html; `baseline` names the variant (seed group) the others are tested against (default:
    the first)."""
    return _build(runs, baseline)[0]


def _mismatch_banner(found: list[Mismatch]) -> list[str]:
    if not found:
        return []
    items = "".join(f"<li><b>{esc(m.topic)}</b>: {esc(m.detail)}</li>" for m in found)
    return [f'<div class="banner warn">These runs are not like for like: their differences mix the methods\' '
            f"effect with these.<ul>{items}</ul></div>"]


def _build(runs: list[Run], baseline: str | None) -> tuple[str, StatsTable, list[Mismatch], list[str]]:
    from .analysis.compare import RunData, build_table, mismatches
    from .analysis.stats import describe

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(seed_group_key(r), []).append(i)
    colours = [""] * len(runs)  # one hue per seed group, a lighter shade for each further seed
    for g, members in enumerate(groups.values()):
        for k, i in enumerate(members):
            colours[i] = plots.shade(plots.color(g), 0.45 * k / max(1, len(members) - 1))
    seeded = [g for g in groups.values() if len(g) > 1]
    arms = _arms(runs, groups)
    arm_of = {i: a for a, members in arms.items() for i in members}
    labels = run_labels(runs, arms)
    stats = build_table({a: [RunData(runs[i].name, runs[i].root, runs[i].records) for i in m] for a, m in arms.items()},
                        baseline)
    found = mismatches({labels[i]: RunData(r.name, r.root, r.records, r.config) for i, r in enumerate(runs)},
                       {a: [labels[i] for i in members] for a, members in arms.items()})
    nums = [numbers(r) for r in runs]
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))

    def swatch(i: int) -> str:
        return f'<span class="sw" style="background:{colours[i]}"></span>{esc(labels[i])}'

    def group_label(g: list[int]) -> str:
        return f"{arm_of[g[0]]} ({len(g)} seeds)"

    overview = [[swatch(i), esc(r.root), esc(r.config.get("run", {}).get("seed", "?")),
                 esc(" → ".join(f"{s.get('method', '?')}:{s.get('domain', '?')}" for s in r.plan)),
                 "yes" if r.events(RUN_END) else '<span class="neg">no</span>'] for i, r in enumerate(runs)]
    body = [f"<h1>cptlab comparison: {len(runs)} runs</h1>", *_mismatch_banner(found),
            table(["run", "directory", "seed", "stages", "finished"], overview, None)]
    body += [f'<div class="banner fault">{esc(labels[i])}: fault in stage {esc(f.get("stage", "?"))}: '
             f'{esc(f.get("reason", "?"))}</div>' for i, r in enumerate(runs) for f in r.events(FAULT)]
    panels = [(labels[i], colours[i], 100 * r.R, [r.stage_label(s) for s in range(len(r.R))], r.domains,
               r.stage_domains) for i, r in enumerate(runs) if r.R.size]
    if panels:
        body += ["<h2>Accuracy matrices</h2>", '<p class="note">Greedy accuracy (%) after each stage (rows) on each '
                 "domain (columns); outlined: the stage's own domain.</p>", img(plots.heatmap_grid(panels), "matrices")]
    cols = [("average_accuracy", False, "avg acc (final)"), ("mean_forgetting", True, "mean forgetting"),
            ("bwt", True, "BWT"), ("fwt", True, "FWT")]

    def value(n: dict, key: str) -> float:
        return n[key][-1] if key == "average_accuracy" else n[key]

    rows = [[swatch(i)] + [(pts(value(n, k), k == "mean_forgetting") if signed else pct(value(n, k)))
                           for k, signed, _ in cols] for i, n in enumerate(nums)]
    rows += [[f"<b>{esc(group_label(g))}</b>"] + [_spread([value(nums[i], k) for i in g], signed)
                                                  for k, signed, _ in cols] for g in seeded]
    body += ["<h2>Forgetting and transfer</h2>", table(["run"] + [h for _, _, h in cols], rows),
             '<p class="note">Accuracy in %, the rest in percentage points. Seed groups (runs whose config differs '
             "only in seed and name): mean ± sample std, then the 95% t interval of the mean.</p>"]
    body += _stats_section(stats)
    bars = [(labels[i], colours[i], [100 * _final(r, d) for d in domains], None, None) for i, r in enumerate(runs)]
    body += ["<h2>Final accuracy per domain</h2>", img(plots.grouped_bars(domains, bars), "final accuracy")]
    if seeded:
        agg = []
        for g in seeded:
            per = np.array([[100 * _final(runs[i], d) for d in domains] for i in g], dtype=float)
            cis = [describe(per[:, j]) for j in range(len(domains))]
            agg.append((group_label(g), colours[g[0]], [c.mean for c in cis], [c.low for c in cis],
                        [c.high for c in cis]))
        body += ["<h3>Mean over seeds (whiskers: 95% t interval)</h3>", img(plots.grouped_bars(domains, agg), "seeds")]
        bands = []
        for g in seeded:
            n_rows = max(len(nums[i]["average_accuracy"]) for i in g)
            by_stage = [describe([100 * nums[i]["average_accuracy"][s] for i in g
                                  if s < len(nums[i]["average_accuracy"])]) for s in range(n_rows)]
            bands.append((group_label(g), colours[g[0]], list(range(n_rows)), [c.mean for c in by_stage],
                          [c.low for c in by_stage], [c.high for c in by_stage]))
        body += ["<h3>Average accuracy over seeds (band: 95% t interval)</h3>",
                 img(plots.band_lines(bands, "stage (0 = base)", "mean greedy accuracy, all domains (%)"), "bands")]
    lines = [(labels[i], colours[i], list(range(len(n["average_accuracy"]))), [100 * v for v in n["average_accuracy"]])
             for i, n in enumerate(nums)]
    body += ["<h2>Average accuracy after each stage</h2>",
             img(plots.lines_by_run(lines, "stage (0 = base)", "mean greedy accuracy (%)"), "average accuracy")]
    drift_panels: dict[str, list] = {}
    general_rows = []
    for i, r in enumerate(runs):
        table_i, by_step = plots.drift_table(r.records)
        general_rows += [_general_row(swatch(i), table_i)] if any(k.startswith("general/") for k in table_i) else []
        if by_step:
            continue  # several drift records per stage: not comparable stage by stage
        for key in _COMPARE_DRIFT:
            if key in table_i:
                x, y = scaled(key, table_i[key])
                drift_panels.setdefault(f"{label(key).name} ({label(key).unit})", []).append(
                    (labels[i], colours[i], x, y))
    if drift_panels:
        body += ["<h2>Drift and artifacts after each stage</h2>",
                 '<p class="note">Parameter drift (relative L2 distance to the base and to the previous stage\'s '
                 "weights), response drift on the probe set (token KL to the base on the model's own samples, share "
                 "of probe prompts whose greedy answer changed), formatting artifacts / repetition in the "
                 "evaluation responses, and general ability (runs of pretrained models: agreement with the base's "
                 "answers to 48 general prompts, token KL to the base on them, perplexity of a fixed text).</p>",
                 img(plots.runs_grid(drift_panels, "stage (0 = base)"), "drift comparison")]
    if general_rows:
        body += ["<h2>General ability after the last stage</h2>",
                 table(["run", "same first line as base", "same next token as base", "token KL to base",
                        "perplexity of a fixed text (base → last)"], general_rows),
                 '<p class="note">48 fixed general prompts answered greedily, against the base model\'s own answers '
                 "(analysis/general.py).</p>"]
    body += _distance_section(runs, labels, colours)
    return page(f"cptlab comparison of {len(runs)} runs", body), stats, found, labels


def _general_row(name: str, drift: dict) -> list[str]:
    """A compare-table row: the last drift record's general/ numbers, perplexity from stage 0 to it."""
    def last(key: str, first: bool = False) -> float:
        ys = drift.get(f"general/{key}", ([], []))[1]
        return ys[0 if first else -1] if ys else math.nan

    from .analysis.compare import fmt

    kl, ppl0, ppl = last("kl_to_base"), last("text_ppl", first=True), last("text_ppl")
    return [name, pct(last("first_line_agreement")), pct(last("token_agreement")),
            fmt(kl, "nats"), "–" if math.isnan(ppl) else f"{ppl0:.1f} → {ppl:.1f}"]


def compare(run_dirs: list[Path | str], out: Path | str, baseline: str | None = None) -> Comparison:
    """Write a side-by-side comparison of the runs to `out` (an .html file, or a directory: compare.html),
    testing every variant against `baseline` (a variant's name; default the first); returns the page's
    path, the statistics and the ways the runs are not like for like."""
    if not run_dirs:
        raise UserError("compare needs at least one run directory")
    out = Path(out)
    out = out / "compare.html" if out.is_dir() or not out.suffix else out
    html, stats, found, labels = _build([load_run(d) for d in run_dirs], baseline)
    atomic_write_text(out, html)
    return Comparison(out, stats, found, labels)


def write_compare(run_dirs: list[Path | str], out: Path | str, baseline: str | None = None) -> Path:
    """`compare`, returning only the page's path."""
    return compare(run_dirs, out, baseline).path
