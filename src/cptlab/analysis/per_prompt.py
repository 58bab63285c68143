"""Per-prompt evaluation records: which held-out prompts each evaluation got right.

One file per evaluation, `evals/stage{S}-step{K}.json` in the run directory (compact JSON, keys
sorted, so equal evaluations give equal bytes):

    {"stage": 1, "stage_name": "gcd", "step": 50, "global_step": 50, "final": true,
     "domains": {"gcd": {"prompts": 256, "config_sha256": "...", "prompts_sha256": "...",
                         "greedy": "0110...",            # 1 = greedy answer correct, eval-set order
                         "num_samples": 4, "sampled_hits": [3, 0, 4, ...]}}}   # only with eval.num_samples > 0

Two runs whose domain entries have equal `config_sha256`, `prompts_sha256` and `prompts` were scored
on the same prompts, so they compare paired (analysis/stats.py: McNemar, paired bootstraps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

EVALS_DIR = "evals"
_NAME = re.compile(r"stage(\d+)-step(\d+)\.json")


def file_name(stage: int, step: int) -> str:
    return f"{EVALS_DIR}/stage{stage}-step{step}.json"


def encode(stage: int, stage_name: str, step: int, global_step: int, final: bool, results: dict,
           identities: dict[str, dict], num_samples: int) -> str:
    """The file's text. results: domain -> evaluate.DomainResult; identities: domain ->
    tasks.eval_set_identity(...)."""
    domains = {}
    for name, r in results.items():
        entry = {**identities[name], "greedy": "".join(str(int(b)) for b in r.per_prompt)}
        if r.sampled_hits is not None:
            entry.update(num_samples=num_samples, sampled_hits=[int(h) for h in r.sampled_hits])
        domains[name] = entry
    record = dict(stage=stage, stage_name=stage_name, step=step, global_step=global_step, final=final,
                  domains=domains)
    return json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"


def load_all(run_dir: Path | str) -> dict[tuple[int, int], dict]:
    """(stage, step) -> record of every readable evals/ file of a run (none for runs that predate them)."""
    out = {}
    for path in sorted(Path(run_dir, EVALS_DIR).glob("stage*-step*.json")):
        m = _NAME.fullmatch(path.name)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if m and isinstance(record, dict):
            out[(int(m[1]), int(m[2]))] = record
    return out


def final_records(run_dir: Path | str) -> dict[int, dict]:
    """stage -> its stage-end record (stage 0: the base model's)."""
    finals: dict[int, tuple[int, dict]] = {}
    for (stage, step), record in load_all(run_dir).items():
        if record.get("final") and (stage not in finals or step > finals[stage][0]):
            finals[stage] = (step, record)
    return {stage: record for stage, (_, record) in sorted(finals.items())}


def final_record(run_dir: Path | str, stage: int) -> dict | None:
    """The stage-end record of `stage` (stage 0: the base model's), or None."""
    return final_records(run_dir).get(stage)


def greedy(record: dict | None, domain: str) -> np.ndarray | None:
    """[prompts] 0/1 greedy correctness of `domain` in `record`, None if absent."""
    entry = (record or {}).get("domains", {}).get(domain)
    return None if entry is None else np.array([c == "1" for c in entry["greedy"]], dtype=float)


def identity(record: dict | None, domain: str) -> tuple | None:
    """(prompts, config_sha256, prompts_sha256) of `domain` in `record`: equal tuples = the same prompts."""
    entry = (record or {}).get("domains", {}).get(domain)
    return None if entry is None else (entry.get("prompts"), entry.get("config_sha256"), entry.get("prompts_sha256"))
