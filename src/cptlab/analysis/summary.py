"""summary.json: the run's headline numbers, derived from metrics.jsonl records only.

Works on partial runs (only the base eval, a crashed stage): whatever cannot be computed yet is
None. The output is strict JSON: NaN and infinities become None, numpy types become Python ones.
Per-stage lists have one entry per planned stage (index s-1 for stage s); accuracies and their
differences are fractions in [0, 1], the headline speaks in percentage points.
"""

from __future__ import annotations

import math

import numpy as np

from .artifacts import detect_collapse
from .metrics import (
    accuracy_matrix, average_accuracy, backward_transfer, forgetting, forward_transfer, in_domain_gain,
    matrix_from_records, mean_forgetting, ood_change, ood_columns, worst_drop,
)


def clean_json(obj):
    """obj with NaN/inf -> None, numpy scalars/arrays -> Python numbers/lists, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _points(x: float) -> int:
    return int(round(100 * x))


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
    g = 0 if math.isnan(gain) else _points(gain)
    if math.isnan(gain):
        text = f"Stage {s}: {method} on {domain} (no evaluation of {domain})"
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
    start = next((r for r in records if r.get("event") == "run_start"), {})
    plan = start.get("stages", []) or []
    faults = [r for r in records if r.get("event") == "fault"]
    end = next((r for r in records if r.get("event") == "run_end"), None)
    names = accuracy_matrix(records)
    R, domains, stage_domains = matrix_from_records(records, "greedy_acc")
    R_sampled, _, _ = matrix_from_records(records, "sampled_acc")
    done = R.shape[0] - 1  # stages with a final eval (-1: not even the base model's)

    by_stage: dict[int, dict[str, list[dict]]] = {}
    for r in records:
        if r.get("event") in ("train", "drift") and isinstance(r.get("stage"), int):
            by_stage.setdefault(r["stage"], {}).setdefault(r["event"], []).append(r)
    n_stages = max([len(plan), done] + [s for s in by_stage])

    def stage_info(s: int) -> tuple[str, str]:
        """(METHOD, domain) of stage s from the plan, else its train records."""
        p = plan[s - 1] if s - 1 < len(plan) else {}
        train = by_stage.get(s, {}).get("train", [{}])
        return (str(p.get("method") or train[0].get("method") or "?").upper(),
                str(p.get("domain") or train[0].get("domain") or "?"))

    nan_stages = [float("nan")] * n_stages
    gains, oods, drops = list(nan_stages), list(nan_stages), [None] * n_stages
    avg = avg_sampled = []
    forget, mean_forget, bwt, fwt = {}, float("nan"), float("nan"), float("nan")
    if done >= 0:
        avg, avg_sampled = average_accuracy(R), average_accuracy(R_sampled)
        forget = dict(zip(domains, forgetting(R)))
        if done >= 1:
            mean_forget = mean_forgetting(R, stage_domains)
            bwt, fwt = backward_transfer(R, stage_domains), forward_transfer(R, stage_domains)
            gains[:done] = in_domain_gain(R, stage_domains)
            oods[:done] = ood_change(R, stage_domains, ood_columns(domains))
            for s in range(1, done + 1):
                col, change = worst_drop(R, s, exclude=[stage_domains[s - 1]])
                drops[s - 1] = None if col is None else {"domain": domains[col], "change": change}

    drift = []
    for s in range(1, n_stages + 1):
        events = by_stage.get(s, {}).get("drift", [])
        drift.append({k: v for k, v in events[-1].items() if k != "event"} if events else None)
    collapse = [_stage_collapse(by_stage.get(s, {}).get("train", [])) for s in range(1, n_stages + 1)]

    headline = []
    if done < 0:
        headline.append("No evaluation recorded yet.")
    else:
        headline.append(f"Base model: mean greedy accuracy {_points(avg[0])}% over {len(domains)} domains.")
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
        text = f"After {done} stages: average accuracy {_points(avg[0])}% -> {_points(avg[-1])}%"
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
    return clean_json({
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
        "forgetting": forget,
        "mean_forgetting": mean_forget,
        "bwt": bwt,
        "fwt": fwt,
        "in_domain_gain": gains,
        "ood_change": oods,
        "worst_drop": drops,
        "drift": drift,
        "collapse": collapse,
        "headline": headline,
    })
