"""Figures and numbers of docs/RESULTS.md from study directories (what `cptlab study` wrote).

    python docs/make_figures.py STUDY_DIR [MORE_STUDY_DIRS ...] [--domain gcd] [--out docs/NAME.png]

Every number is recomputed from the cells' metrics.jsonl (never from summary.json, whose forgetting
keys older versions defined differently) and reported as mean, sample std (ddof 1) and the 95% t
interval over seeds, with the number of seeds behind it. Bands in the figures are those intervals.

Single-stage studies: the trained domain, its OOD variant and the mean of the untrained prior domains
at each evaluation. With several study directories whose base models differ (e.g. ood_gpu and
ood_gpu_sdpo_frozen), changes from each cell's own base are plotted instead of accuracies, and the
legend names the base.

Continual studies (cells with several stages): per variant the average accuracy after each stage
(all domains), mean forgetting (Chaudhry et al.; and with the base row, the earlier definition),
the average over trained domains, BWT, FWT, in-domain gains, end-of-run drift and artifacts, collapse
flags and faults. A stage that fewer seeds reached than started is drawn dashed and labelled with
its seed count (e.g. collapse_gpu's current-teacher cells after a NaN gradient).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics as st
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cptlab.analysis.stats import describe  # noqa: E402
from cptlab.analysis.summary import build_summary  # noqa: E402
from cptlab.store import read_jsonl  # noqa: E402

DRIFT_KEYS = ("param/rel_l2_base", "response/kl_to_base", "response/answer_changed_frac",
              "artifacts/repetition_rate", "artifacts/malformed_rate", "artifacts/multiple_answer_rate")
"""Drift-record fields reported per stage (summary's `drift` list: entry i is stage i + 1)."""


def stats(values, scale: float = 100.0, digits: int = 1) -> dict | None:
    """{n, mean, std, ci} of the non-missing values, scaled and rounded; None if there are none."""
    s = describe([scale * v for v in values if v is not None and not math.isnan(v)])
    if s.n == 0:
        return None
    r = (lambda x: None if math.isnan(x) else round(x, digits))
    return {"n": s.n, "mean": r(s.mean), "std": r(s.std), "ci": [r(s.low), r(s.high)]}


def text(s: dict | None, signed: bool = False, digits: int = 1) -> str:
    """'mean±std [low, high]' of a stats() dict; '(n=1)' where one seed gives no spread."""
    if not s:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if s["std"] is None:
        return f.format(s["mean"]) + f" (n={s['n']})"
    return f"{f.format(s['mean'])}±{s['std']:.{digits}f} [{f.format(s['ci'][0])}, {f.format(s['ci'][1])}]"


def base_tag(rows: list[dict]) -> str:
    """A fingerprint of the base model: its stage-0 accuracies (deterministic within a study)."""
    base = sorted((r["domain"], round(r["greedy_acc"], 6)) for r in rows if r["event"] == "eval" and r["stage"] == 0)
    return hashlib.sha256(json.dumps(base).encode()).hexdigest()[:8]


def load(studies: list[Path]) -> dict[str, list[dict]]:
    """variant -> one {'curve': {(step, domain): acc}, 'drift': last drift record, 'base': tag} per seed."""
    cells = defaultdict(list)
    names = defaultdict(set)
    for study in studies:
        for metrics in sorted(study.glob("*-s*/metrics.jsonl")):
            names[metrics.parent.name.rsplit("-s", 1)[0]].add(study.name)
    for study in studies:
        for metrics in sorted(study.glob("*-s*/metrics.jsonl")):
            variant = metrics.parent.name.rsplit("-s", 1)[0]
            if len(names[variant]) > 1:
                variant = f"{variant} ({study.name})"
            rows = read_jsonl(metrics)
            curve = {(r["step"] if r["stage"] else 0, r["domain"]): r["greedy_acc"]
                     for r in rows if r["event"] == "eval"}
            drift = [r for r in rows if r["event"] == "drift" and r["stage"] > 0]  # stage 0 is the base itself
            cells[variant].append({"curve": curve, "drift": drift[-1] if drift else {}, "base": base_tag(rows)})
    return dict(cells)


def band(ax, x, series: list[dict | None], label: str | None = None, color=None, dashed_below: int | None = None):
    """Mean line with its 95% t band; points with fewer than `dashed_below` seeds are dashed and labelled."""
    pts = [(xi, s) for xi, s in zip(x, series) if s]
    if not pts:
        return None
    xs, ss = [p[0] for p in pts], [p[1] for p in pts]
    full = [s for s in ss if dashed_below is None or s["n"] >= dashed_below]
    line, = ax.plot(xs[:len(full)], [s["mean"] for s in full], marker="o", ms=3, label=label, color=color)
    if len(full) < len(ss):  # a tail that fewer seeds reached
        tail = ss[len(full) - 1:] if full else ss
        tx = xs[len(full) - 1:] if full else xs
        ax.plot(tx, [s["mean"] for s in tail], marker="o", ms=3, ls="--", color=line.get_color())
        for xi, s in zip(xs[len(full):], ss[len(full):]):
            ax.annotate(f"n={s['n']}", (xi, s["mean"]), fontsize=6, xytext=(2, 3), textcoords="offset points",
                        color=line.get_color())
    lo = [s["ci"][0] if s["ci"][0] is not None else s["mean"] for s in ss]
    hi = [s["ci"][1] if s["ci"][1] is not None else s["mean"] for s in ss]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def continual(studies: list[Path], out: Path) -> None:
    """Per-variant numbers and figure of a multi-stage study, rebuilt from its cells' metrics.jsonl."""
    cells: dict[str, list[dict]] = defaultdict(list)
    n_domains = 0
    for study in studies:
        for path in sorted(study.glob("*-s*/metrics.jsonl")):
            rows = read_jsonl(path)
            cells[path.parent.name.rsplit("-s", 1)[0]].append({**build_summary(rows), "base": base_tag(rows)})
            n_domains = max(n_domains, len({r["domain"] for r in rows if r["event"] == "eval"}))
    summary = {}
    fig, axes = plt.subplots(1, 5, figsize=(18.5, 3.4), dpi=80)
    for variant, runs in cells.items():
        n_stages = max(len(r["average_accuracy"]) for r in runs)
        avg = [stats([r["average_accuracy"][i] if i < len(r["average_accuracy"]) else None for r in runs])
               for i in range(n_stages)]
        n_drift = max(len(r["drift"]) for r in runs)
        drift = {key: [stats([(r["drift"][i] or {}).get(key) if i < len(r["drift"]) else None for r in runs], 1.0, 6)
                       for i in range(n_drift)] for key in DRIFT_KEYS}
        summary[variant] = {
            "seeds": len(runs),
            "bases": sorted({r["base"] for r in runs}),
            "completed_stages": [r.get("stages_completed") for r in runs],
            "faults": [f.get("reason") for r in runs for f in r.get("faults") or []],
            "average_accuracy_by_stage": avg,
            "average_accuracy_trained_final": stats([(r.get("average_accuracy_trained") or [None])[-1] for r in runs]),
            "mean_forgetting": stats([r.get("mean_forgetting") for r in runs]),
            "mean_forgetting_incl_base": stats([r.get("mean_forgetting_incl_base") for r in runs]),
            "bwt": stats([r.get("bwt") for r in runs]),
            "fwt": stats([r.get("fwt") for r in runs]),
            "in_domain_gain": [[None if g is None else round(100 * g, 1) for g in r["in_domain_gain"]] for r in runs],
            "drift_by_stage": drift,
            "collapse_flags": [[(c["step"], c["signals"]) if c else None for c in r.get("collapse", [])] for r in runs],
        }
        s = summary[variant]
        print(f"{variant:14s} avg acc by stage " + " | ".join(text(x) for x in avg))
        print(f"{'':14s} forgetting {text(s['mean_forgetting'])} (incl. base {text(s['mean_forgetting_incl_base'])}) "
              f"BWT {text(s['bwt'], True)} FWT {text(s['fwt'], True)} "
              f"trained avg {text(s['average_accuracy_trained_final'])}")
        print(f"{'':14s} end drift " + ", ".join(f"{k.split('/')[1]} {text(v[-1], digits=4)}"
                                                 for k, v in drift.items() if v and v[-1])
              + (f" | faults {s['faults']}" if s["faults"] else ""))
        line = band(axes[0], range(n_stages), avg, variant, dashed_below=len(runs))
        for ax, key in ((axes[1], "param/rel_l2_base"), (axes[2], "response/kl_to_base"),
                        (axes[3], "artifacts/malformed_rate"), (axes[4], "artifacts/multiple_answer_rate")):
            series = [None if v is None else {**v, "ci": [max(v["ci"][0], 1e-5) if v["ci"][0] is not None else None,
                                                          v["ci"][1]]} for v in drift[key]]
            band(ax, range(1, n_drift + 1), series, color=line.get_color() if line else None, dashed_below=len(runs))
    axes[0].set(title=f"average greedy accuracy, all {n_domains} domains (%)", xlabel="stage (0 = base)")
    axes[1].set(title="weights: relative L2 to base", xlabel="stage")
    axes[2].set(title="responses: token KL to base", xlabel="stage", yscale="log")
    axes[3].set(title="malformed answers (probe, greedy)", xlabel="stage", yscale="log")
    axes[4].set(title="answers holding several answer blocks", xlabel="stage", yscale="log")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("mean over seeds, band: 95% t interval; dashed: fewer seeds (n = seeds that reached the stage)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def single(studies: list[Path], domain: str, out: Path) -> None:
    cells = load(studies)
    bases = {c["base"] for runs in cells.values() for c in runs}
    as_change = len(bases) > 1  # different base models: only changes from each cell's own base compare
    steps = sorted({s for runs in cells.values() for r in runs for s, d in r["curve"] if d == domain})
    ood = f"{domain}_ood"
    others = sorted({d for runs in cells.values() for r in runs for _, d in r["curve"]} - {domain, ood})
    summary = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=90)

    def curve(r: dict, d: str) -> list[float | None]:
        ref = r["curve"].get((0, d), 0.0) if as_change else 0.0
        return [None if (s, d) not in r["curve"] else r["curve"][(s, d)] - ref for s in steps]

    def untrained(r: dict) -> list[float | None]:
        ref = st.mean(r["curve"][(0, d)] for d in others) if as_change else 0.0
        return [st.mean(r["curve"][(s, d)] for d in others if (s, d) in r["curve"]) - ref
                if any((s, d) in r["curve"] for d in others) else None for s in steps]

    for variant, runs in cells.items():
        label = variant + (f" [base {runs[0]['base']}]" if as_change else "")
        series = {name: [stats(col) for col in zip(*(fn(r) for r in runs))]
                  for name, fn in ((domain, lambda r: curve(r, domain)), (ood, lambda r: curve(r, ood)),
                                   ("untrained", untrained))}
        line = band(axes[0], steps, series[domain], label)
        band(axes[1], steps, series[ood], color=line.get_color())
        band(axes[2], steps, series["untrained"], color=line.get_color())
        last = steps[-1]
        kl = [r["drift"].get("response/kl_to_base") for r in runs if r["drift"]]
        summary[variant] = {
            "seeds": len(runs),
            "base": sorted({r["base"] for r in runs}),
            "base_accuracy": {d: round(100 * runs[0]["curve"][(0, d)], 1) for d in (domain, ood)
                              if (0, d) in runs[0]["curve"]},
            f"{domain}_by_step": {s: stats([r["curve"].get((s, domain)) for r in runs]) for s in steps},
            f"{domain}_delta": stats([r["curve"][(last, domain)] - r["curve"][(0, domain)] for r in runs
                                      if (last, domain) in r["curve"]]),
            f"{ood}_delta": stats([r["curve"][(last, ood)] - r["curve"][(0, ood)] for r in runs
                                   if (last, ood) in r["curve"]]),
            "untrained_mean_delta": stats([st.mean(r["curve"][(last, d)] - r["curve"][(0, d)] for d in others)
                                           for r in runs if all((last, d) in r["curve"] for d in others)]),
            "response_kl_to_base": stats(kl, 1.0, 3),
        }
        s = summary[variant]
        print(f"{variant:28s} " + " ".join(f"{k}:{text(v)}" for k, v in s[f"{domain}_by_step"].items())
              + f" | {domain} Δ {text(s[f'{domain}_delta'], True)} | {ood} Δ {text(s[f'{ood}_delta'], True)}"
              + f" | untrained Δ {text(s['untrained_mean_delta'], True)}"
              + (f" | KL {text(s['response_kl_to_base'], digits=3)}" if kl else ""))
    what = "change from base (points)" if as_change else "greedy accuracy (%)"
    axes[0].set(title=f"{domain} (trained), {what}", xlabel="step")
    axes[1].set(title=f"{ood} (partially related), {what}", xlabel="step")
    axes[2].set(title=f"the other {len(others)} domains (mean)", xlabel="step")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("mean over seeds, band: 95% t interval" + ("; cells on different bases: changes from each "
                                                           "cell's own base" if as_change else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def distance(studies: list[Path], out: Path) -> None:
    """Each untrained domain's accuracy drop over each stage against its MMD^2 to the stage's trained
    domain (the cells' distance.json: `cptlab distance`, or written by compare), one dot per (cell,
    stage, domain), coloured by variant, with the mean drop over domain pairs (`pair_means`: the
    independent units) in equal-count distance bins and its 95% t interval."""
    from cptlab.analysis.distance import binned, forgetting_vs_distance, pair_means
    from cptlab.analysis.metrics import matrix_from_records

    by_variant = defaultdict(list)
    for study in studies:
        for metrics in sorted(study.glob("*-s*/metrics.jsonl")):
            dist_file = metrics.parent / "distance.json"
            if not dist_file.is_file():
                continue
            rows = read_jsonl(metrics)
            R, domains, stage_cols = matrix_from_records(rows)
            for point in forgetting_vs_distance(R, domains, stage_cols, json.loads(dist_file.read_text())):
                by_variant[metrics.parent.name.rsplit("-s", 1)[0]].append(point)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    pooled = []
    for variant, points in sorted(by_variant.items()):
        ax.scatter([p["distance"] for p in points], [100 * p["forgetting"] for p in points], s=14, label=variant)
        pooled += points
    # the points share domain pairs across cells and stages: the independent units are the pair means
    bins = binned(pair_means(pooled), 6)
    print(f"{'MMD^2 bin':>20s} {'pairs':>6s} {'mean drop over pairs [95% t] (points)':>40s}")
    for b in bins:
        print(f"{b['low_distance']:9.4f}-{b['high_distance']:<9.4f} {b['n']:6d} "
              f"{100 * b['mean']:+14.1f} [{100 * b['low']:+.1f}, {100 * b['high']:+.1f}]")
    mean = [100 * b["mean"] for b in bins]
    ax.errorbar([b["distance"] for b in bins], mean, yerr=[[m - 100 * b["low"] for m, b in zip(mean, bins)],
                                                           [100 * b["high"] - m for m, b in zip(mean, bins)]],
                color="#222222", marker="s", capsize=3, label="mean over domain pairs [95% t]")
    ax.axhline(0, color="#888888", linewidth=0.8)
    ax.set_xlabel("MMD² to the stage's trained domain (base model's embeddings)")
    ax.set_ylabel("accuracy drop over the stage (points)")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("studies", type=Path, nargs="+")
    p.add_argument("--domain", default="gcd")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--distance", action="store_true", help="forgetting against domain distance (distance.json)")
    a = p.parse_args()
    out = a.out or Path("docs") / f"{a.studies[0].name}.png"
    if a.distance:
        distance(a.studies, out)
        return
    first = next(iter(sorted(a.studies[0].glob("*-s*/metrics.jsonl"))), None)
    start = next((r for r in read_jsonl(first) if r.get("event") == "run_start"), {}) if first else {}
    if len(start.get("stages", [])) > 1:
        continual(a.studies, out)
    else:
        single(a.studies, a.domain, out)


if __name__ == "__main__":
    main()
