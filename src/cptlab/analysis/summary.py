"""summary.json: the run's headline numbers, derived from metrics.jsonl records only."""

from __future__ import annotations

from .metrics import accuracy_matrix


def build_summary(records: list[dict]) -> dict:
    start = next((r for r in records if r["event"] == "run_start"), {})
    matrix = accuracy_matrix(records)
    faults = [r for r in records if r["event"] == "fault"]
    end = next((r for r in records if r["event"] == "run_end"), None)
    return {
        "name": start.get("name"),
        "base": start.get("base"),
        "stages": start.get("stages", []),
        "complete": end is not None,
        "seconds": end.get("seconds") if end else None,
        "domains": matrix["domains"],
        "stage_names": matrix["stage_names"],
        "accuracy_matrix": matrix["greedy_acc"],
        "faults": faults,
    }
