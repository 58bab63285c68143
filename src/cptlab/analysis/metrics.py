"""Accuracy matrix from a run's evaluation records (more metrics in issue #4)."""

from __future__ import annotations


def accuracy_matrix(records: list[dict], metric: str = "greedy_acc") -> dict:
    """R[stage][domain] from the stage-end ('final') eval records; stage 0 is the base model."""
    finals = [r for r in records if r.get("event") == "eval" and r.get("final")]
    stages = sorted({r["stage"] for r in finals})
    domains = list(dict.fromkeys(r["domain"] for r in finals))
    names = {r["stage"]: r["stage_name"] for r in finals}
    table = {(r["stage"], r["domain"]): r.get(metric) for r in finals}
    return {"stages": stages, "stage_names": [names[s] for s in stages], "domains": domains,
            metric: [[table.get((s, d)) for d in domains] for s in stages]}
