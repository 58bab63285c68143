"""Figures and numbers of docs/RESULTS.md from a study directory (what `cptlab study` wrote).

    python docs/make_figures.py STUDY_DIR [--domain gcd] [--out docs/NAME.png]

Single-stage studies: reads every cell's metrics.jsonl (<variant>-s<seed>/), prints the trained
domain's greedy accuracy at each evaluation (mean and population std over seeds), the change on the
untrained domains and the response drift at the end, writes a compact JSON of the curves next to the
PNG, and plots accuracy vs step per variant (mean line, min-max band over seeds) for the trained
domain and the untrained ones.

Continual studies (cells with several stages): reads every cell's summary.json and prints, per
variant, the average accuracy after each stage, mean forgetting, BWT, FWT, the in-domain gain per
stage, the end-of-run drift and artifact rates, collapse flags and faults; plots the average accuracy,
the weights' distance to the base, the response KL to the base and the malformed-answer rate per stage.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cptlab.store import read_jsonl  # noqa: E402


def load(study: Path) -> dict[str, list[dict]]:
    """variant -> one {'curve': {(step, domain): acc}, 'drift': last drift record} per seed."""
    cells = defaultdict(list)
    for metrics in sorted(study.glob("*-s*/metrics.jsonl")):
        variant = metrics.parent.name.rsplit("-s", 1)[0]
        rows = read_jsonl(metrics)
        curve = {(r["step"] if r["stage"] else 0, r["domain"]): r["greedy_acc"] for r in rows if r["event"] == "eval"}
        drift = [r for r in rows if r["event"] == "drift" and r["stage"] > 0]  # stage 0 is the base itself
        cells[variant].append({"curve": curve, "drift": drift[-1] if drift else {}})
    return dict(cells)


def _ms(values: list, scale: float = 100.0, digits: int = 1) -> list | None:
    """[mean, population std] of the non-missing values, scaled and rounded; None if there are none."""
    xs = [scale * v for v in values if v is not None]
    return [round(st.mean(xs), digits), round(st.pstdev(xs), digits)] if xs else None


DRIFT_KEYS = ("param/rel_l2_base", "response/kl_to_base", "response/answer_changed_frac",
              "artifacts/repetition_rate", "artifacts/malformed_rate")
"""Drift-record fields reported per stage (summary.json's `drift` list: entry i is stage i + 1)."""


def continual(study: Path, out: Path) -> None:
    """Per-variant numbers and figure of a multi-stage study from its cells' summary.json."""
    cells: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(study.glob("*-s*/summary.json")):
        cells[path.parent.name.rsplit("-s", 1)[0]].append(json.loads(path.read_text()))
    summary = {}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=80)
    for variant, runs in cells.items():
        n_stages = max(len(r["average_accuracy"]) for r in runs)
        avg = [_ms([r["average_accuracy"][i] if i < len(r["average_accuracy"]) else None for r in runs])
               for i in range(n_stages)]
        drift = {key: [_ms([(r["drift"][i] or {}).get(key) if i < len(r["drift"]) else None for r in runs], 1.0, 4)
                       for i in range(len(runs[0]["drift"]))] for key in DRIFT_KEYS}
        summary[variant] = {
            "seeds": len(runs),
            "completed_stages": [r.get("stages_completed") for r in runs],
            "faults": [f.get("reason") for r in runs for f in r.get("faults") or []],
            "average_accuracy_by_stage": avg,
            "mean_forgetting": _ms([r.get("mean_forgetting") for r in runs]),
            "bwt": _ms([r.get("bwt") for r in runs]),
            "fwt": _ms([r.get("fwt") for r in runs]),
            "in_domain_gain": [[round(100 * g, 1) for g in r["in_domain_gain"] if g is not None] for r in runs],
            "drift_by_stage": drift,
            "collapse_flags": [[(c["step"], c["signals"]) if c else None for c in r.get("collapse", [])] for r in runs],
        }
        s = summary[variant]
        print(f"{variant:14s} avg acc by stage " + " ".join(f"{m:.1f}±{sd:.1f}" for m, sd in (x for x in avg if x))
              + f" | forgetting {s['mean_forgetting']} BWT {s['bwt']} FWT {s['fwt']}")
        print(f"{'':14s} end drift " + ", ".join(f"{k.split('/')[1]} {v[-1]}" for k, v in drift.items() if v and v[-1])
              + (f" | faults {s['faults']}" if s["faults"] else ""))
        x = [i for i, v in enumerate(avg) if v]
        line, = axes[0].plot(x, [avg[i][0] for i in x], marker="o", ms=3, label=variant)
        for ax, key in ((axes[1], "param/rel_l2_base"), (axes[2], "response/kl_to_base"),
                        (axes[3], "artifacts/malformed_rate")):
            xs = [i + 1 for i, v in enumerate(drift[key]) if v]
            ax.plot(xs, [drift[key][i - 1][0] for i in xs], marker="o", ms=3, color=line.get_color())
    axes[0].set(title="average greedy accuracy, 12 domains (%)", xlabel="stage (0 = base)")
    axes[1].set(title="weights: relative L2 to base", xlabel="stage")
    axes[2].set(title="responses: token KL to base", xlabel="stage", yscale="log")
    axes[3].set(title="malformed answers (eval, greedy)", xlabel="stage", yscale="log")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study", type=Path)
    p.add_argument("--domain", default="gcd")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    out = a.out or Path("docs") / f"{a.study.name}.png"
    first = next(iter(sorted(a.study.glob("*-s*/summary.json"))), None)
    if first is not None and len(json.loads(first.read_text()).get("stages", [])) > 1:
        continual(a.study, out)
        return
    cells = load(a.study)
    steps = sorted({s for runs in cells.values() for r in runs for s, d in r["curve"] if d == a.domain})
    others = sorted({d for runs in cells.values() for r in runs for _, d in r["curve"]} - {a.domain, f"{a.domain}_ood"})
    summary = {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for variant, runs in cells.items():
        trained = [[r["curve"].get((s, a.domain)) for s in steps] for r in runs]
        untrained = [[st.mean(r["curve"][(s, d)] for d in others if (s, d) in r["curve"]) for s in steps] for r in runs]
        mean_t = [100 * st.mean(col) for col in zip(*trained)]
        mean_u = [100 * st.mean(col) for col in zip(*untrained)]
        line, = ax1.plot(steps, mean_t, marker="o", ms=3, label=variant)
        ax1.fill_between(steps, [100 * min(c) for c in zip(*trained)], [100 * max(c) for c in zip(*trained)],
                         color=line.get_color(), alpha=0.15)
        ax2.plot(steps, mean_u, marker="o", ms=3, color=line.get_color())
        last = steps[-1]
        ood = [r["curve"][(last, f"{a.domain}_ood")] - r["curve"][(0, f"{a.domain}_ood")] for r in runs
               if (last, f"{a.domain}_ood") in r["curve"]]
        kl = [r["drift"].get("response/kl_to_base") for r in runs if r["drift"]]
        summary[variant] = {
            "seeds": len(runs),
            f"{a.domain}_by_step": {s: [round(100 * st.mean(c), 1), round(100 * st.pstdev(c), 1)]
                                    for s, c in zip(steps, zip(*trained))},
            "untrained_mean_delta": [round(100 * st.mean(u[-1] - u[0] for u in untrained), 1),
                                     round(100 * st.pstdev([u[-1] - u[0] for u in untrained]), 1)],
            f"{a.domain}_ood_delta": [round(100 * st.mean(ood), 1), round(100 * st.pstdev(ood), 1)] if ood else None,
            "response_kl_to_base": [round(st.mean(kl), 3), round(st.pstdev(kl), 3)] if kl else None,
        }
        s = summary[variant]
        print(f"{variant:14s} " + " ".join(f"{k}:{m:5.1f}±{sd:4.1f}" for k, (m, sd) in s[f"{a.domain}_by_step"].items())
              + f" | untrained Δ {s['untrained_mean_delta'][0]:+.1f}±{s['untrained_mean_delta'][1]:.1f}"
              + (f" | ood Δ {s[f'{a.domain}_ood_delta'][0]:+.1f}±{s[f'{a.domain}_ood_delta'][1]:.1f}" if ood else "")
              + (f" | KL {s['response_kl_to_base'][0]:.3f}" if kl else ""))
    ax1.set(title=f"{a.domain} (trained), greedy accuracy %", xlabel="step")
    ax2.set(title=f"untrained prior domains (mean of {len(others)})", xlabel="step")
    ax1.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
