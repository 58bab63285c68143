"""Does one stage of GRPO / SDPO raise a domain's greedy accuracy? (issue: methods)

    python benchmarks/single_stage_gain.py [--domain gcd] [--steps 300] [--methods grpo,sdpo] [key=value ...]

Builds (or reuses from the cache) the tiny base model, then for each method runs one stage on the
domain and prints greedy accuracy before and after, the gain in points and the wall time. SDPO uses
the `current` teacher here (the issue's setting); pass method.sdpo.teacher.mode=ema to change it.
"""

import argparse
import json
import tempfile
import time

from cptlab.config import StageConfig, load_config
from cptlab.api import run_continual
from cptlab.store import read_jsonl


def one(method: str, domain: str, steps: int, extra: list[str], root: str) -> dict:
    teacher = ["method.sdpo.teacher.mode=current"] if method == "sdpo" else []
    cfg = load_config("tiny", [f"method.name={method}", *teacher,
                               f"eval.domains=[{domain}]", "eval.num_prompts=256", "eval.num_samples=0", "eval.drift=false",
                               "run.report=false", "run.checkpoint=false", *extra])
    cfg.stages = [StageConfig(domain=domain, steps=steps)]
    t0 = time.perf_counter()
    out = run_continual(cfg, out_dir=f"{root}/{method}")
    seconds = time.perf_counter() - t0
    finals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval" and r["final"]]
    before, after = finals[0]["greedy_acc"], finals[-1]["greedy_acc"]
    return dict(method=method, domain=domain, steps=steps, before=before, after=after,
                gain_points=100 * (after - before), seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--domain", default="gcd")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", default="grpo,sdpo")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = [one(m, a.domain, a.steps, a.overrides, root) for m in a.methods.split(",")]
    print(f"{'method':8s} {'domain':12s} {'steps':>5s} {'before':>7s} {'after':>7s} {'gain':>6s} {'time':>7s}")
    for r in rows:
        print(f"{r['method']:8s} {r['domain']:12s} {r['steps']:5d} {r['before']:7.1%} {r['after']:7.1%} "
              f"{r['gain_points']:+6.1f} {r['seconds']:6.0f}s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
