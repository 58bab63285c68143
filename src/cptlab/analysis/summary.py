"""summary.json: the run's headline numbers, derived from metrics.jsonl records only.

Works on partial runs (only the base eval, a crashed stage): whatever cannot be computed yet is
None. The output is strict JSON: NaN and infinities become None, numpy types become Python ones.
Per-stage lists have one entry per planned stage (index s-1 for stage s); accuracies and their
differences are fractions in [0, 1], the headline speaks in percentage points.
"""

from __future__ import annotations

import math

import numpy as np

from ..store import strict_json
from .artifacts import detect_collapse
from .metrics import (
    accuracy_matrix, average_accuracy, average_accuracy_trained, backward_transfer, forgetting, forward_transfer,
    in_domain_gain, matrix_from_records, mean_forgetting, ood_change, ood_columns, worst_drop,
)
from ..metric_names import DRIFT, FAULT, GREEDY_ACC, RUN_END, RUN_START, SAMPLED_ACC, TRAIN

METRICS_VERSION = 2
"""Bumped when a summary key changes meaning. 2: `forgetting` and `mean_forgetting` follow Chaudhry et
al. 2018 (rows after training only); the earlier definition, base row included, is `*_incl_base`."""
REDEFINED = ("forgetting", "mean_forgetting")
"""Keys whose meaning changed at METRICS_VERSION: a summary.json without that version must not be read
for them (readers rebuild them from metrics.jsonl)."""


def _points(x: float) -> int:
    return int(round(100 * x))


def _percent(x: float) -> str:
    return "not evaluated" if math.isnan(x) else f"{_points(x)}%"


def _stage_collapse(train: list[dict]) -> dict | None:
    """detect_collapse on one stage's train records: accuracy (else reward), entropy, repetition."""
    train = sorted(train, key=lambda r: r.get("global_step", r.get("step", 0)))
    key = "accuracy" if any(r.get("accuracy") is not None for r in train) else "reward"
    if not train or not any(r.get(key) is not None for r in train):
        return None

    def series(*names):
        for name in names:
            if any(r.get(name) is not None for r in train):
                return [r.get(name) for r in train]
        return None

    flag = detect_collapse([r.get("global_step", r.get("step")) for r in train], [r.get(key) for r in train],
                           series("entropy"), series("repetition_rate", "artifacts/repetition_rate"),
                           window=max(1, min(10, len(train) // 10)))
    return {**flag, "metric": key} if flag else None


def _headline(s: int, method: str, domain: str, gain: float, ood: float, drop: tuple[str | None, float]) -> str:
    g = None if math.isnan(gain) else _points(gain)  # NaN: the stage's domain is not in eval.domains
    if g is None:
        text = f"Stage {s}: {method} on {domain} ({domain} not evaluated)"
    elif g > 0:
        text = f"Stage {s}: {method} gained {g} points on {domain}"
    elif g < 0:
        text = f"Stage {s}: {method} lost {-g} points on {domain}"
    else:
        text = f"Stage {s}: {method} left {domain} unchanged"
    if not math.isnan(ood):
        text += f" (OOD {_points(ood):+d})"
    other, change = drop
    if other is None:
        return text + "; no other domain evaluated."
    if _points(change) <= -1:
        return text + f" and lost {-_points(change)} on {other}."
    return text + " with no drop elsewhere."


def build_summary(records: list[dict]) -> dict:
    records = [r for r in records if isinstance(r, dict)]
    start = next((r for r in records if r.get("event") == RUN_START), {})
    plan = start.get("stages", []) or []
    faults = [r for r in records if r.get("event") == FAULT]
    end = next((r for r in records if r.get("event") == RUN_END), None)
    names = accuracy_matrix(records)
    R, domains, stage_domains = matrix_from_records(records, GREEDY_ACC)
    R_sampled, _, _ = matrix_from_records(records, SAMPLED_ACC)
    done = R.shape[0] - 1  # stages with a final eval (-1: not even the base model's)

    by_stage: dict[int, dict[str, list[dict]]] = {}
    for r in records:
        if r.get("event") in (TRAIN, DRIFT) and isinstance(r.get("stage"), int):
            by_stage.setdefault(r["stage"], {}).setdefault(r["event"], []).append(r)
    n_stages = max([len(plan), done] + [s for s in by_stage])

    def stage_info(s: int) -> tuple[str, str]:
        """(METHOD, domain) of stage s from the plan, else its train records."""
        p = plan[s - 1] if s - 1 < len(plan) else {}
        train = by_stage.get(s, {}).get(TRAIN, [{}])
        return (str(p.get("method") or train[0].get("method") or "?").upper(),
                str(p.get("domain") or train[0].get("domain") or "?"))

    nan_stages = [float("nan")] * n_stages
    gains, oods, drops = list(nan_stages), list(nan_stages), [None] * n_stages
    avg = avg_sampled = avg_trained = []
    forget, forget_base = {}, {}
    mean_forget = mean_forget_base = bwt = fwt = float("nan")
    if done >= 0:
        avg, avg_sampled = average_accuracy(R), average_accuracy(R_sampled)
        forget, forget_base = dict(zip(domains, forgetting(R))), dict(zip(domains, forgetting(R, include_base=True)))
        if done >= 1:
            avg_trained = average_accuracy_trained(R, stage_domains)
            mean_forget = mean_forgetting(R, stage_domains)
            mean_forget_base = mean_forgetting(R, stage_domains, include_base=True)
            bwt, fwt = backward_transfer(R, stage_domains), forward_transfer(R, stage_domains)
            gains[:done] = in_domain_gain(R, stage_domains)
            oods[:done] = ood_change(R, stage_domains, ood_columns(domains))
            for s in range(1, done + 1):
                col, change = worst_drop(R, s, exclude=[stage_domains[s - 1]])
                drops[s - 1] = None if col is None else {"domain": domains[col], "change": change}

    drift = []
    for s in range(1, n_stages + 1):
        events = by_stage.get(s, {}).get(DRIFT, [])
        drift.append({k: v for k, v in events[-1].items() if k != "event"} if events else None)
    collapse = [_stage_collapse(by_stage.get(s, {}).get(TRAIN, [])) for s in range(1, n_stages + 1)]

    headline = []
    if done < 0:
        headline.append("No evaluation recorded yet.")
    else:
        never = [d for j, d in enumerate(domains) if np.isnan(R[:, j]).all()]
        n = len(domains) - len(never)
        headline.append(f"Base model: mean greedy accuracy {_percent(avg[0])} over {n} evaluated "
                        f"domain{'' if n == 1 else 's'}.")
        if never:
            headline.append(f"Trained but not evaluated (not in eval.domains): {', '.join(never)}.")
    for s in range(1, done + 1):
        method, domain = stage_info(s)
        d = drops[s - 1]
        headline.append(_headline(s, method, domain, gains[s - 1], oods[s - 1],
                                  (d["domain"], d["change"]) if d else (None, float("nan"))))
    for s, flag in enumerate(collapse, start=1):
        if flag:
            method, domain = stage_info(s)
            headline.append(f"Stage {s} ({method} on {domain}) collapsed at step {flag['step']}: {flag['metric']} "
                            f"{flag['peak']:.2f} -> {flag['value']:.2f} ({', '.join(flag['signals'])}).")
    if done >= 2:
        text = f"After {done} stages: average accuracy {_percent(avg[0])} -> {_percent(avg[-1])}"
        if not any(map(math.isnan, (mean_forget, bwt, fwt))):
            text += f"; mean forgetting {_points(mean_forget)} points, BWT {_points(bwt):+d}, FWT {_points(fwt):+d}"
        headline.append(text + ".")
    if end is None or done < len(plan):
        stopped = next((f for f in faults if f.get("action") == "stopped"), None)
        reason = f" (fault: {str(stopped.get('reason'))[:120]})" if stopped else ""
        headline.append(f"Run incomplete: {max(done, 0)} of {len(plan) or n_stages} stages finished{reason}.")

    stage_names = ["base"] + [stage_info(s)[1] for s in range(1, done + 1)] if done >= 0 else []
    named = dict(zip(names["stages"], names["stage_names"]))
    stage_names = [named.get(s, n) for s, n in enumerate(stage_names)]
    to_rows = (lambda M: [list(row) for row in M])
    return strict_json({
        "metrics_version": METRICS_VERSION,
        "name": start.get("name"),
        "base": start.get("base"),
        "stages": plan,
        "complete": end is not None,
        "seconds": end.get("seconds") if end else None,
        "domains": domains,
        "stage_names": stage_names,
        "accuracy_matrix": to_rows(R),
        "faults": faults,
        "stages_completed": max(done, 0),
        "accuracy_matrix_sampled": to_rows(R_sampled),
        "average_accuracy": avg,
        "average_accuracy_sampled": avg_sampled,
        "average_accuracy_trained": avg_trained,
        "forgetting": forget,
        "mean_forgetting": mean_forget,
        "forgetting_incl_base": forget_base,
        "mean_forgetting_incl_base": mean_forget_base,
        "bwt": bwt,
        "fwt": fwt,
        "in_domain_gain": gains,
        "ood_change": oods,
        "worst_drop": drops,
        "drift": drift,
        "collapse": collapse,
        "headline": headline,
    })
