"""report.html for one run and compare.html for several: single self-contained files, readable offline.

Everything comes from the run directory (metrics.jsonl, summary.json, config.yaml, samples/), so a
report can be rebuilt for any run, finished or not. Figures are PNG data URIs (plots.py); there is no
JavaScript and no external resource. Every string that came from a model, a task or a config goes
through `esc`, so a completion holding `<script>` or a terminal escape shows as text.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import plots
from .errors import UserError
from .store import atomic_write_text, read_jsonl

TRAIN_CURVES = {"reward": "reward", "kl_to_base": "KL to base", "entropy": "entropy",
                "response_length": "response length (tokens)"}
SDPO_CURVES = {"sdpo/divergence": "SDPO divergence", "sdpo/top1_agreement": "teacher/student top-1 agreement",
               "teacher/with_demo_frac": "reprompts with a demonstration",
               "teacher/feedback_only_frac": "reprompts with feedback only"}
DRIFT_SECTIONS = [("param", "Parameter drift", "Distance of the weights from the base model, after each stage."),
                  ("response", "Response drift", "How the model's outputs differ from the base model's."),
                  ("artifacts", "Artifact rates", "Fraction of evaluation responses showing each artifact."),
                  ("general", "General ability", "48 fixed general prompts (facts, instructions, completions) "
                   "against the base model's own greedy answers, and the perplexity of a fixed English paragraph "
                   "(analysis/general.py); stage 0 is the base itself.")]
GENERAL_NAMES = {"first_line_agreement": "same first line as the base",  # panel titles of the general/ fields
                 "token_agreement": "same next token as the base", "kl_to_base": "token KL to the base (its answers)",
                 "text_ppl": "perplexity of a fixed text"}
DRIFT_SKIP = {"num_tensors", "char_level"}  # bookkeeping fields of the drift records, not measurements
SAMPLES_PER_STAGE = 6
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def esc(value) -> str:
    """Text for HTML: control characters spelled out (ESC shows as \\x1b), then html.escape."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        str(value))
    return html.escape(text, quote=True)


def _num(value) -> float:
    """A finite float, else NaN (None, strings and infinities alike)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def pct(value) -> str:
    x = _num(value)
    return '<span class="muted">–</span>' if math.isnan(x) else f"{100 * x:.1f}%"


NOT_EVALUATED = '<span class="muted">not evaluated</span>'


def pts(value, lower_is_better: bool = False) -> str:
    """A difference of accuracies in signed percentage points, green when good and red when bad."""
    x = _num(value)
    if math.isnan(x):
        return '<span class="muted">–</span>'
    good = -x if lower_is_better else x
    cls = "pos" if good > 0.0005 else "neg" if good < -0.0005 else "zero"
    return f'<span class="{cls}">{100 * x:+.1f}</span>'


# -- a run on disk ------------------------------------------------------------------------------------
@dataclass
class Run:
    root: Path
    records: list[dict]
    summary: dict  # summary.json, completed by a fresh build_summary of the records
    config: dict
    plan: list[dict]  # run_start's stages: {domain, steps, method}
    R: np.ndarray  # [S+1, D] greedy accuracy after each finished stage (row 0: base), NaN = missing
    domains: list[str]
    stage_domains: list[int]  # column of the domain trained at stage s (index s-1), -1 if unknown

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.config.get("run", {}).get("name") or self.root.name)

    @property
    def methods(self) -> list[str]:
        return [str(s.get("method", "?")).upper() for s in self.plan]

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == kind]

    def stage(self, s: int) -> dict:
        """The plan of stage s (1-based): {domain, steps, method}, {} if unknown."""
        st = self.plan[s - 1] if 0 < s <= len(self.plan) else {}
        return {"method": str(st.get("method", "?")).upper(), "domain": st.get("domain", "?"),
                "steps": st.get("steps", "")}

    def stage_label(self, s: int) -> str:
        return "0 · base" if s == 0 else f"{s} · {self.stage(s)['method']} {self.stage(s)['domain']}"


def load_run(run_dir: Path | str) -> Run:
    root = Path(run_dir)
    if not (root / "metrics.jsonl").is_file():
        raise UserError(f"{root}: no metrics.jsonl here; expected a cptlab run directory")
    records = [r for r in read_jsonl(root / "metrics.jsonl") if isinstance(r, dict)]
    try:
        config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else None
    except yaml.YAMLError as e:
        raise UserError(f"{root / 'config.yaml'}: not valid YAML ({str(e).splitlines()[0]})") from None
    start = next((r for r in records if r.get("event") == "run_start"), {})
    return Run(root, records, _read_summary(root, records), config if isinstance(config, dict) else {},
               list(start.get("stages") or []), *_matrix(records))


def _read_summary(root: Path, records: list[dict]) -> dict:
    """summary.json as written, its gaps filled by a fresh build_summary (older runs lack newer keys)."""
    from .analysis.summary import REDEFINED, build_summary

    try:
        fresh = build_summary(records)
    except Exception:  # records the current analysis cannot read: the report still shows what it can
        fresh = {}
    try:
        on_disk = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError):
        on_disk = {}
    if not isinstance(on_disk, dict):
        return fresh
    if fresh and on_disk.get("metrics_version") != fresh.get("metrics_version"):
        on_disk = {k: v for k, v in on_disk.items() if k not in REDEFINED}  # they meant something else then
    return {**fresh, **{k: v for k, v in on_disk.items() if v is not None}}


def _matrix(records: list[dict]) -> tuple[np.ndarray, list[str], list[int]]:
    """(R, domains, stage_domains) by analysis.metrics, or from accuracy_matrix with an older one."""
    from .analysis import metrics

    if hasattr(metrics, "matrix_from_records"):
        return metrics.matrix_from_records(records)
    view = metrics.accuracy_matrix(records)
    domains = view["domains"]
    R = np.array([[_num(v) for v in row] for row in view["greedy_acc"]], dtype=float).reshape(-1, len(domains))
    start = next((r for r in records if r.get("event") == "run_start"), {})
    planned = [st.get("domain") for st in start.get("stages") or []][: max(0, len(R) - 1)]
    return R, domains, [domains.index(d) if d in domains else -1 for d in planned]


def _per(value, n: int, names: list[str]) -> list[float] | None:
    """A summary entry as n floats: a list (cut or NaN-padded to n) or a dict keyed by `names`."""
    if isinstance(value, dict):
        return [_num(value.get(k)) for k in names]
    if isinstance(value, list):
        return [_num(v) for v in value[:n]] + [math.nan] * (n - len(value))
    return None


def numbers(run: Run) -> dict:
    """Forgetting/transfer numbers from the summary (built afresh from the records); NaN where absent."""
    S, D = len(run.stage_domains), len(run.domains)
    sizes = {"average_accuracy": S + 1, "average_accuracy_trained": S + 1, "forgetting": D, "in_domain_gain": S,
             "ood_change": S}
    out = {k: _per(run.summary.get(k), n, run.domains) or [math.nan] * n for k, n in sizes.items()}
    return {**out, **{k: _num(run.summary.get(k)) for k in ("mean_forgetting", "mean_forgetting_incl_base", "bwt",
                                                             "fwt")}}


def headlines(run: Run) -> list[str]:
    """The summary's headline strings, else one plain sentence per finished stage."""
    given = run.summary.get("headline")
    if given:
        return [str(h) for h in given] if isinstance(given, list) else [str(given)]
    out = []
    for s, d in enumerate(run.stage_domains, start=1):
        change = run.R[s] - run.R[s - 1]
        gain = change[d] if 0 <= d < len(change) else math.nan
        text = f"{run.stage(s)['method']} on {run.stage(s)['domain']}: "
        text += "in-domain accuracy not evaluated" if np.isnan(gain) else f"{100 * gain:+.1f} points in-domain"
        others = [(c, name) for j, (c, name) in enumerate(zip(change, run.domains)) if j != d and not np.isnan(c)]
        drop, name = min(others, default=(math.nan, ""))
        text += (f", largest drop −{-100 * drop:.1f} on {name}" if drop < -0.0005
                 else ", no other domain dropped" if others else "")
        out.append(text + ".")
    return out or ["No stage finished yet: only the base model's evaluation is available."]


# -- data for the figures ---------------------------------------------------------------------------
def latest_samples(run: Run) -> dict[int, tuple[int, Path]]:
    """stage -> (step, path) of the stage's last samples file."""
    found: dict[int, tuple[int, Path]] = {}
    for p in (run.root / "samples").glob("stage*-step*.json"):
        m = re.fullmatch(r"stage(\d+)-step(\d+)\.json", p.name)
        if m and (int(m[1]) not in found or int(m[2]) > found[int(m[1])][0]):
            found[int(m[1])] = (int(m[2]), p)
    return dict(sorted(found.items()))


# -- HTML -----------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2329;background:#f4f5f7;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #dde1e6}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6670;margin:0 0 14px}
.card{background:#fff;border-radius:8px;padding:14px 18px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:10px 0}
.headline li{margin:3px 0;font-size:16px}.note{color:#5b6670;font-size:13px;margin:4px 0 8px}
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
"""


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


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _banners(run: Run) -> list[str]:
    out = [f'<div class="banner fault">Fault in stage {esc(f.get("stage", "?"))} at global step '
           f'{esc(f.get("global_step", "?"))}: {esc(f.get("reason", "unknown"))} (action: {esc(f.get("action", "?"))})'
           f'</div>' for f in run.events("fault")]
    if not run.events("run_end"):
        out.append('<div class="banner warn">This run has not finished (no run_end record): the report shows '
                   'what was written so far.</div>')
    collapse = run.summary.get("collapse")
    for s, flag in enumerate(collapse if isinstance(collapse, list) else [], start=1):
        if isinstance(flag, dict) and flag:
            signals = ", ".join(map(str, flag.get("signals") or [])) or "accuracy fell"
            out.append(f'<div class="banner warn">Stage {esc(run.stage_label(s))} collapsed at step '
                       f'{esc(flag.get("step", "?"))}: {esc(flag.get("metric", "accuracy"))} '
                       f'{_num(flag.get("peak")):.2f} → {_num(flag.get("value")):.2f} ({esc(signals)})</div>')
    return out


def _metrics_section(run: Run, nums: dict) -> list[str]:
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
    return ["<h2>Forgetting and transfer</h2>", '<div class="card">', scalar,
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


def _samples_section(run: Run) -> list[str]:
    out, files = [], latest_samples(run)
    for s, (step, path) in files.items():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data = {d: [it for it in items if isinstance(it, dict)] for d, items in data.items()
                if isinstance(items, list)} if isinstance(data, dict) else {}
        per_domain = max(1, SAMPLES_PER_STAGE // max(1, len(data)))  # spread the handful over the domains
        rows = [[esc(d), f"<pre>{esc(it.get('question', ''))}</pre>", f"<pre>{esc(it.get('completion', ''))}</pre>",
                 '<span class="ok">✓</span>' if it.get("correct") else '<span class="bad">✗</span>',
                 "-" if "lenient_correct" not in it else "yes" if it["lenient_correct"] else "no",
                 "yes" if it.get("well_formed") else "no"] for d, items in data.items() for it in items[:per_domain]]
        is_open = " open" if s in (min(files), max(files)) or len(files) <= 3 else ""  # base and last stage
        out += [f"<details{is_open}><summary>after stage {esc(run.stage_label(s))} (step {step})</summary>",
                table(["domain", "question", "completion", "correct", "lenient", "well-formed"], rows[:SAMPLES_PER_STAGE],
                      None, "samples"), "</details>"]
    return ["<h2>Sample responses</h2>", '<p class="note">A few evaluation samples from the last evaluation of '
            'each stage, verbatim (escaped; control characters spelled out).</p>', *out] if out else []


GEOMETRY_COLUMNS = [("spectral_shift", "spectral shift", lambda v: f"{v:.2e}"),
                    ("max_angle", "largest principal angle (°)", lambda v: f"{v:.2f}"),
                    ("principal_mask_overlap", "principal mask kept", pct),
                    ("principal_update_share", "updates in principal mask", pct)]


def _geometry_section(run: Run) -> list[str]:
    """Per stage and module type, the weight-geometry numbers of the stage's last drift record."""
    last = {r["stage"]: r for r in run.events("drift") if isinstance(r.get("stage"), int) and r["stage"] > 0}
    rows = []
    for s, record in sorted(last.items()):
        for kind in ("all", "attention", "mlp", "embedding", "other"):
            values = [_num(record.get(f"param/{key}" + ("" if kind == "all" else f"/{kind}")))
                      for key, _, _ in GEOMETRY_COLUMNS]
            if not all(math.isnan(v) for v in values):
                rows.append([esc(run.stage_label(s)) if kind == "all" else "", kind] +
                            ['<span class="muted">–</span>' if math.isnan(v) else fmt(v)
                             for v, (_, _, fmt) in zip(values, GEOMETRY_COLUMNS)])
    if not rows:
        return []
    return ["<h2>Weight geometry per module type</h2>",
            '<p class="note">Each weight matrix W against the base W0, averaged over the matrices of a type '
            "(after “The Path Not Taken”, arXiv 2511.08567): spectral shift ||σ(W) − σ(W0)|| / ||σ(W0)||; "
            "largest principal angle between the top-k left singular subspaces (k = min(m, n) / 8); the share of W0's "
            "principal weights (top half of the rank-r reconstruction, r = min(m, n) / 64) still principal in W; "
            "the share of the most-moved half of the entries that are principal weights of W0 (random placement: "
            "50%; below it, updates avoid them).</p>",
            table(["after stage", "module type"] + [h for _, h, _ in GEOMETRY_COLUMNS], rows, 2)]


def build_report(run: Run) -> str:
    stages = " → ".join(f"{esc(st['method'])} {esc(st['domain'])} ({esc(st['steps'])} steps)"
                        for st in map(run.stage, range(1, len(run.plan) + 1))) or "no stages"
    base = run.summary.get("base") if isinstance(run.summary.get("base"), dict) else {}
    facts = [f"base: {esc(base.get('source', '?'))}", f"seed {esc(run.config.get('run', {}).get('seed', '?'))}"]
    if isinstance(base.get("parameters"), (int, float)):
        facts[0] += f", {base['parameters'] / 1e6:.2f}M parameters"
    if not math.isnan(_num(run.summary.get("seconds"))):
        facts.append(f"{_num(run.summary['seconds']):.0f} s")
    body = [f"<h1>{esc(run.name)}</h1>", f'<p class="sub">{stages}<br>{" · ".join(facts)}</p>', *_banners(run),
            '<div class="card headline"><ul>' + "".join(f"<li>{esc(h)}</li>" for h in headlines(run)) + "</ul></div>"]
    if run.R.size:
        body += ["<h2>Accuracy matrix</h2>", '<p class="note">Greedy accuracy (%) of the model after each stage '
                 "(rows) on each evaluation domain (columns); the outlined cell is the stage's own domain; "
                 "– : not evaluated.</p>",
                 img(plots.accuracy_heatmap(100 * run.R, [run.stage_label(s) for s in range(len(run.R))],
                                            run.domains, run.stage_domains), "accuracy matrix")]
    bounds = plots.stage_bounds(run.records, run.stage_label)
    evals, train = run.events("eval"), run.events("train")
    acc = {d: plots.series([r for r in evals if r.get("domain") == d], "greedy_acc") for d in run.domains}
    acc = {d: (x, [100 * v for v in y]) for d, (x, y) in acc.items() if x}
    if acc:
        body += ["<h2>Accuracy during training</h2>", '<p class="note">Every evaluation (mid-stage and stage end) '
                 "of each domain; dashed lines mark stage boundaries.</p>",
                 img(plots.accuracy_over_steps(acc, bounds), "accuracy over global steps")]
    body += _metrics_section(run, numbers(run))
    for title, keys in (("Training curves", TRAIN_CURVES), ("SDPO self-teacher", SDPO_CURVES)):
        curves = {name: {"": plots.series(train, key)} for key, name in keys.items()}
        curves = {name: c for name, c in curves.items() if c[""][0]}
        if curves:
            body += [f"<h2>{title}</h2>", img(plots.curve_grid(curves, bounds), title)]
    drift, by_step = plots.drift_table(run.records, run.summary.get("drift"))
    labels = {s: run.stage_label(s) for s in range(len(run.plan) + 1)}
    for prefix, title, note in DRIFT_SECTIONS:
        part: plots.Panels = {}  # param/rel_l2_base and param/rel_l2_base/mlp share a panel
        for key, xy in drift.items():
            head, metric, sub = (key.split("/", 2) + [""])[:3]
            if head == prefix and metric not in DRIFT_SKIP:
                name = GENERAL_NAMES.get(metric, metric) if head == "general" else metric
                part.setdefault(name, {})[sub or "all"] = xy
        part = {m: ({"": lines["all"]} if list(lines) == ["all"] else lines) for m, lines in part.items()}
        if part:
            figure = plots.curve_grid(part, bounds, ncols=3) if by_step else plots.stage_grid(part, labels)
            body += [f"<h2>{title}</h2>", f'<p class="note">{note}</p>', img(figure, title)]
    body += _geometry_section(run)
    if not drift:
        body.append('<p class="note">No drift records in this run (runs from older versions have none).</p>')
    body += _samples_section(run)
    if (run.root / "config.yaml").is_file():
        body.append(f'<details><summary>Resolved config (config.yaml)</summary><pre class="config">'
                    f"{esc((run.root / 'config.yaml').read_text())}</pre></details>")
    return page(f"cptlab report: {run.name}", body)


def write_report(run_dir: Path | str) -> Path:
    """Write run_dir/report.html (self-contained: figures embedded, no scripts) and return its path."""
    run = load_run(run_dir)
    path = run.root / "report.html"
    atomic_write_text(path, build_report(run))
    return path


# -- several runs side by side -------------------------------------------------------------------------
_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_]?\d+$")


def run_label(run: Run) -> str:
    methods = run.methods[:1] if len(set(run.methods)) == 1 else run.methods
    return f"{run.name} ({'→'.join(methods) or 'no stages'})"


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
    """Seed groups named by their runs' name without the seed suffix (a study's variant names)."""
    arms: dict[str, list[int]] = {}
    for members in groups.values():
        first = runs[members[0]]
        name = _SEED_SUFFIX.sub("", first.name) or first.name
        arms[name if name not in arms else f"{name} [{first.root.name}]"] = members
    return arms


def _stats_section(stats) -> list[str]:
    """compare.html's statistics table (analysis/compare.py): one row per number and variant."""
    from .analysis.compare import cell_text, fmt, fmt_p
    from .analysis.stats import direction_word

    rows = []
    for row in stats.rows:
        for k, arm in enumerate(stats.arms):
            s, d = row.per_arm[arm], row.vs_baseline.get(arm)
            dk = "raw" if row.kind == "raw" else "pts"
            word = direction_word((d.low, d.high)) if d else ""
            cls = {"higher": "neg" if row.lower_is_better else "pos",
                   "lower": "pos" if row.lower_is_better else "neg"}.get(word, "zero")
            against = "baseline" if arm == stats.baseline else esc(
                f"{fmt(d.diff, dk, True)} [{fmt(d.low, dk, True)}, {fmt(d.high, dk, True)}]")
            rows.append([esc(row.label + (" (lower is better)" if row.lower_is_better else "")) if k == 0 else "",
                         esc(arm), esc(s.n), esc(cell_text(s, row.kind)), against,
                         esc(fmt_p(d.p_welch)) if d else "", esc(fmt_p(d.p_perm)) if d else "",
                         f'<span class="{cls}">{esc(word)}</span>' if d else ""])
    note = ('<p class="note">Per variant (runs that differ only in seed): mean ± sample std [95% t interval] over '
            f'seeds. Against the baseline <b>{esc(stats.baseline)}</b> (<code>--baseline</code>): the difference of '
            "means with its 95% interval (Welch's t over seeds; where every run has per-prompt records of the same "
            "eval set, widened to also cover the hierarchical bootstrap over seeds and prompts), Welch's p and the "
            "exact permutation p over seeds (with 3 vs 3 seeds it cannot go below 0.10). Verdict rule: higher or "
            "lower only where the interval excludes zero, else inconclusive. Accuracy in %, differences and "
            "forgetting/BWT/FWT in points."
            + (f" {stats.paired_rows} accuracy rows use per-prompt records." if stats.paired_rows else
               " No per-prompt records (evals/): prompt noise is not in these intervals.") + "</p>")
    return ["<h2>Statistics over seeds</h2>", note,
            table(["number", "variant", "seeds", "mean ± std [95% interval]", "vs baseline [95% interval]",
                   "Welch p", "perm. p", "verdict"], rows, 2)]


_COMPARE_DRIFT = [
    ("param/rel_l2_base", "weights: rel. L2 to base"),
    ("param/rel_l2_prev", "weights: rel. L2 to previous stage"),
    ("param/effective_rank", "update effective rank"),
    ("param/spectral_shift", "weights: spectral shift"),
    ("param/max_angle", "weights: largest principal angle (°)"),
    ("param/principal_mask_overlap", "principal mask kept"),
    ("param/principal_update_share", "updates in principal mask"),
    ("response/kl_to_base", "responses: KL to base"),
    ("response/answer_changed_frac", "greedy answers changed"),
    ("response/entropy", "response entropy"),
    ("artifacts/malformed_rate", "malformed answers"),
    ("artifacts/repetition_rate", "repetition rate"),
    ("artifacts/distinct_2", "distinct-2"),
    ("general/first_line_agreement", "general prompts: same first line as base"),
    ("general/kl_to_base", "general prompts: token KL to base"),
    ("general/text_ppl", "perplexity of a fixed text"),
]


def _distance_section(runs: list[Run], labels: list[str], colours: list[str]) -> list[str]:
    """Each domain's accuracy drop over a stage against its MMD^2 to the stage's trained domain, one dot
    per (run, stage, other domain), from each run's distance.json (computed first where it is missing and
    the run's base model is there)."""
    from .analysis.distance import forgetting_vs_distance, run_distance

    memo: dict = {}  # runs on one base model share one computation
    series = []
    for i, run in enumerate(runs):
        try:
            distance = run_distance(run.root, memo)
        except (UserError, OSError, RuntimeError, ValueError) as e:  # one unreadable base must not cost the page
            warnings.warn(f"{run.root}: no domain distance ({e})")
            continue
        points = forgetting_vs_distance(run.R, run.domains, run.stage_domains, distance) if distance else []
        if points:
            series.append((labels[i], colours[i], [p["distance"] for p in points],
                           [100 * p["forgetting"] for p in points]))
    if not series:
        return []
    return ["<h2>Forgetting against domain distance</h2>",
            '<p class="note">One dot per run, stage and untrained domain: the domain\'s greedy-accuracy drop over '
            "the stage (points; positive = forgotten) against its distance to the stage's domain, the MMD² (RBF "
            "kernel, median-heuristic bandwidth) between the two domains' held-out prompts embedded by the run's "
            "base model (mean-pooled last hidden layer; <code>cptlab distance</code>). The dark line: mean drop in "
            "equal-count bins of distance, all runs pooled.</p>",
            img(plots.scatter_by_run(series, "MMD² to the stage's trained domain", "accuracy drop (points)"),
                "forgetting against domain distance")]


def build_compare(runs: list[Run], baseline: str | None = None) -> str:
    """compare.html; `baseline` names the variant (seed group) the others are tested against (default:
    the first)."""
    from .analysis.compare import RunData, build_table
    from .analysis.stats import describe

    labels = [run_label(r) for r in runs]
    labels = [f"{lab} [{r.root.name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(seed_group_key(r), []).append(i)
    colours = [""] * len(runs)  # one hue per seed group, a lighter shade for each further seed
    for g, members in enumerate(groups.values()):
        for k, i in enumerate(members):
            colours[i] = plots.shade(plots.color(g), 0.45 * k / max(1, len(members) - 1))
    seeded = [g for g in groups.values() if len(g) > 1]
    arms = _arms(runs, groups)
    stats = build_table({a: [RunData(runs[i].name, runs[i].root, runs[i].records) for i in m] for a, m in arms.items()},
                        baseline)
    nums = [numbers(r) for r in runs]
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))

    def swatch(i: int) -> str:
        return f'<span class="sw" style="background:{colours[i]}"></span>{esc(labels[i])}'

    def group_label(g: list[int]) -> str:
        first = runs[g[0]]
        return f"{_SEED_SUFFIX.sub('', first.name) or first.name} ({'→'.join(first.methods)}), {len(g)} seeds"

    overview = [[swatch(i), esc(r.root), esc(r.config.get("run", {}).get("seed", "?")),
                 esc(" → ".join(f"{s.get('method', '?')}:{s.get('domain', '?')}" for s in r.plan)),
                 "yes" if r.events("run_end") else '<span class="neg">no</span>'] for i, r in enumerate(runs)]
    body = [f"<h1>cptlab comparison: {len(runs)} runs</h1>", table(["run", "directory", "seed", "stages", "finished"],
                                                                   overview, None)]
    body += [f'<div class="banner fault">{esc(labels[i])}: fault in stage {esc(f.get("stage", "?"))}: '
             f'{esc(f.get("reason", "?"))}</div>' for i, r in enumerate(runs) for f in r.events("fault")]
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
        table_i, by_step = plots.drift_table(r.records, r.summary.get("drift"))
        general_rows += [_general_row(swatch(i), table_i)] if any(k.startswith("general/") for k in table_i) else []
        if by_step:
            continue  # several drift records per stage: not comparable stage by stage
        for key, title in _COMPARE_DRIFT:
            if key in table_i:
                x, y = table_i[key]
                drift_panels.setdefault(title, []).append((labels[i], colours[i], x, y))
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
    return page(f"cptlab comparison of {len(runs)} runs", body)


def _general_row(name: str, drift: dict) -> list[str]:
    """A compare-table row: the last drift record's general/ numbers, perplexity from stage 0 to it."""
    def last(key: str, first: bool = False) -> float:
        ys = drift.get(f"general/{key}", ([], []))[1]
        return ys[0 if first else -1] if ys else math.nan

    kl, ppl0, ppl = last("kl_to_base"), last("text_ppl", first=True), last("text_ppl")
    return [name, pct(last("first_line_agreement")), pct(last("token_agreement")),
            "–" if math.isnan(kl) else f"{kl:.3f}", "–" if math.isnan(ppl) else f"{ppl0:.1f} → {ppl:.1f}"]


def write_compare(run_dirs: list[Path | str], out: Path | str, baseline: str | None = None) -> Path:
    """Write a side-by-side comparison of the runs to `out` (an .html file, or a directory: compare.html),
    testing every variant against `baseline` (a variant's name; default the first)."""
    if not run_dirs:
        raise UserError("compare needs at least one run directory")
    out = Path(out)
    out = out / "compare.html" if out.is_dir() or not out.suffix else out
    atomic_write_text(out, build_compare([load_run(d) for d in run_dirs], baseline))
    return out
