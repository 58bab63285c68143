"""The four kinds on a real model (docs/RESULTS.md, "The four kinds"), in one command for the lent GPU:

    python benchmarks/paper_kinds.py --out DIR [--steps 40] [--jobs 4] [key=value ...]

1. levels: the format-warmed base (preset paper_kinds_smollm2) evaluated on every difficulty level of
   every kind (src/cptlab/data/paper_kinds_natural/<kind>_l1..l3.jsonl; a stage of 0 steps, so only
   the base is evaluated), 128 held-out prompts each -> DIR/levels/.
2. pick: per kind, the level whose greedy accuracy is inside [10%, 70%] and nearest 40% (else the
   nearest to that band) -> DIR/levels.json.
3. study: `cptlab study paper_kinds_smollm2` with those levels, one GRPO stage of --steps on one kind
   per cell -> DIR/study/ (compare.html, each cell's report with paired intervals).
Overrides (key=value) go to every run, e.g. model.path=/tmp/cptlab-gguf/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

KINDS = {"math": ("problem", "answer", "solution", "math"), "science": ("question", "answer", "explanation", "choice"),
         "tooluse": ("instruction", "call", None, "tool_call"), "code": ("task", "solution", None, "code")}
LEVELS = (1, 2, 3)
BAND, TARGET = (0.10, 0.70), 0.40


def domain_spec(kind: str, level: int) -> dict:
    question, answer, reasoning, verifier = KINDS[kind]
    fields = {"question": question, "answer": answer}
    fields.update({"reasoning": reasoning} if reasoning else {})
    fields.update({"choices": "choices"} if kind == "science" else {})
    fields.update({"tools": "tools"} if kind == "tooluse" else {})
    fields.update({"entry_point": "entry_point", "tests": "tests"} if kind == "code" else {})
    return {"source": f"cptlab:paper_kinds_natural/{kind}_l{level}.jsonl", "verifier": verifier, "fields": fields,
            "eval_pool": 256}


def cptlab(*args: str) -> None:
    print("+ cptlab " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cptlab.cli", *args], check=True)


def pick(levels_dir: Path) -> dict[str, int]:
    accuracy = {}
    for line in (levels_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "eval" and r.get("stage") == 0:
            accuracy[r["domain"]] = r["greedy_acc"]
    chosen = {}
    for kind in KINDS:
        def distance(level: int) -> tuple[float, float]:
            a = accuracy[f"{kind}_l{level}"]
            outside = max(BAND[0] - a, a - BAND[1], 0.0)
            return outside, abs(a - TARGET)
        chosen[kind] = min(LEVELS, key=distance)
    return {"accuracy": accuracy, "chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    levels = {f"{k}_l{n}": domain_spec(k, n) for k in KINDS for n in LEVELS}
    config = {"extends": "paper_kinds_smollm2", "domains": levels, "run": {"name": "levels"},
              "eval": {"domains": list(levels), "num_prompts": 128, "drift": False},
              "stages": [{"domain": "math_l1", "steps": 0}]}
    (args.out / "levels.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if not (args.out / "levels" / "summary.json").exists():
        cptlab("run", str(args.out / "levels.yaml"), "--out", str(args.out / "levels"), "--overwrite", *args.overrides)
    picked = pick(args.out / "levels")
    (args.out / "levels.json").write_text(json.dumps(picked, indent=1))
    print(json.dumps(picked), flush=True)

    chosen = [f"domains.{k}.source=cptlab:paper_kinds_natural/{k}_l{n}.jsonl" for k, n in picked["chosen"].items()]
    study = {"preset": "paper_kinds_smollm2", "seeds": [0], "overrides": [*chosen, *args.overrides],
             "question": "One GRPO stage per kind of data on SmolLM2-135M-Instruct.",
             "variants": {k: [f"stages=[{{domain: {k}, steps: {args.steps}}}]"] for k in KINDS}}
    (args.out / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    cptlab("study", str(args.out / "study.yaml"), "--out", str(args.out / "study"), "--jobs", str(args.jobs),
           "--baseline", "math")


if __name__ == "__main__":
    main()
