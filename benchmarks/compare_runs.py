"""Do two runs hold the same numbers? Compares their metrics.jsonl record by record, timing fields left
out, and prints the first differences (exit 1) or "identical" (exit 0):

    python benchmarks/compare_runs.py RUN_A RUN_B [--rtol 0]

For a refactor that must not move numbers: run the same config (same seed, one thread:
CPTLAB_NUM_THREADS=1) before and after, and compare. --rtol allows a relative difference in floats
(e.g. 1e-6 where a change of summation order is expected); the default demands equality.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TIMING = {"step_seconds", "rollout_seconds", "tokens_per_second", "seconds", "warmup_seconds", "eval_seconds"}
"""Fields that measure time, not the model: they differ between any two runs."""


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        base = r.get("base")
        if isinstance(base, dict):  # where the base came from (paths, cache) is not a number of the run
            r["base"] = {k: v for k, v in base.items() if k in ("weights_sha256", "parameters", "warmup_final_loss")}
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def differences(a, b, rtol: float, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'A' if k in a else 'B'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], rtol, f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0)
    args = parser.parse_args()
    ra, rb = records(args.a), records(args.b)
    diffs = [f"record count: {len(ra)} vs {len(rb)}"] if len(ra) != len(rb) else []
    for i, (x, y) in enumerate(zip(ra, rb)):
        diffs += differences(x, y, args.rtol, f"record {i} ({x.get('event')})")
    if diffs:
        print(f"{len(diffs)} differences; first ones:\n" + "\n".join(diffs[:20]))
        sys.exit(1)
    print(f"identical: {len(ra)} records (timing fields left out)")


if __name__ == "__main__":
    main()
