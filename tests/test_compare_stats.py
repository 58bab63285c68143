"""The statistics table of compare.html and `cptlab study` (analysis/compare.py) on hand-written runs:
two variants x 3 seeds whose final accuracies are chosen so that every number can be checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cptlab.analysis import per_prompt
from cptlab.analysis.compare import RunData, build_table, format_text
from cptlab.analysis.stats import difference
from cptlab.errors import ConfigError
from cptlab.compare_page import write_compare
from cptlab.store import read_jsonl
from cptlab.study import study_statistics

PROMPTS = 50
IDENT = {"prompts": PROMPTS, "config_sha256": "c" * 64, "prompts_sha256": "p" * 64}
# final greedy accuracy on gcd (in 50ths) per seed; sorting is untrained and ends at 40/50 everywhere
GCD = {"grpo": [25, 26, 27], "sdpo": [30, 31, 33]}


def write_run(root: Path, variant: str, seed: int, hits: int, records_per_prompt: bool = True) -> Path:
    """Base (gcd 20/50, sorting 45/50) -> one stage on gcd -> gcd hits/50, sorting 40/50."""
    root.mkdir(parents=True)
    name = f"{variant}-s{seed}"
    config = {"run": {"name": name, "seed": seed}, "method": {"name": variant}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"event": "run_start", "name": name, "domains": ["gcd", "sorting"],
             "stages": [{"domain": "gcd", "steps": 10, "method": variant}]}]
    finals = {0: {"gcd": 20, "sorting": 45}, 1: {"gcd": hits, "sorting": 40}}
    for stage, acc in finals.items():
        step = 10 * stage
        for d, k in acc.items():
            rows.append({"event": "eval", "stage": stage, "stage_name": "base" if stage == 0 else "gcd", "step": step,
                         "global_step": step, "final": True, "domain": d, "greedy_acc": k / PROMPTS})
        if records_per_prompt:
            record = {"stage": stage, "step": step, "final": True,
                      "domains": {d: {**IDENT, "greedy": "1" * k + "0" * (PROMPTS - k)} for d, k in acc.items()}}
            (root / "evals").mkdir(exist_ok=True)
            (root / per_prompt.file_name(stage, step)).write_text(json.dumps(record))
    rows.append({"event": "drift", "stage": 1, "global_step": 10, "response/kl_to_base": 0.01 * (seed + 1)})
    rows.append({"event": "run_end", "seconds": 1.0})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture()
def study(tmp_path) -> dict[str, list[Path]]:
    return {v: [write_run(tmp_path / f"{v}-s{s}", v, s, k) for s, k in enumerate(hits)] for v, hits in GCD.items()}


def data(arms: dict[str, list[Path]]) -> dict[str, list[RunData]]:
    return {v: [RunData(p.name, p, read_jsonl(p / "metrics.jsonl")) for p in cells] for v, cells in arms.items()}


def test_table_numbers_by_hand(study):
    table = build_table(data(study))
    assert table.baseline == "grpo" and table.seeds == {"grpo": 3, "sdpo": 3}
    rows = {r.key: r for r in table.rows}
    gcd = rows["acc/gcd"]
    sdpo = np.array(GCD["sdpo"]) / PROMPTS
    assert gcd.per_arm["sdpo"].mean == pytest.approx(sdpo.mean())
    assert gcd.per_arm["sdpo"].std == pytest.approx(sdpo.std(ddof=1))
    d = gcd.vs_baseline["sdpo"]
    assert d.diff == pytest.approx((94 - 78) / 3 / PROMPTS)  # 0.1067
    assert d.p_perm == pytest.approx(0.10)  # fully separated 3 vs 3: the smallest possible
    assert d.method.startswith("Welch t ∪")  # per-prompt records of one eval set: prompts resampled too
    assert d.low == min(d.welch_low, d.boot_low) and d.low > 0
    assert "grpo" not in gcd.vs_baseline
    # all domains: (gcd + sorting) / 2; trained domains: gcd alone
    assert rows["avg_all"].per_arm["grpo"].mean == pytest.approx((26 + 40) / 2 / PROMPTS)
    assert rows["avg_trained"].per_arm["grpo"].mean == pytest.approx(26 / PROMPTS)
    assert rows["acc/sorting"].vs_baseline["sdpo"].diff == 0.0
    assert rows["response/kl_to_base"].per_arm["sdpo"].mean == pytest.approx(0.02)
    assert "mean_forgetting" not in rows  # one stage: no forgetting to report
    assert table.paired_rows == 4  # average (all, trained), gcd, sorting


def test_baseline_choice_and_errors(study):
    table = build_table(data(study), baseline="sdpo")
    d = next(r for r in table.rows if r.key == "acc/gcd").vs_baseline["grpo"]
    assert d.diff == pytest.approx(-(94 - 78) / 3 / PROMPTS)
    with pytest.raises(ConfigError, match="--baseline"):
        build_table(data(study), baseline="nope")
    text = study_statistics(study, "grpo")
    assert "final accuracy: gcd" in text and "vs grpo: +10.7" in text and "-> higher" in text


def test_without_per_prompt_records_the_interval_is_welch(tmp_path):
    arms = {v: [write_run(tmp_path / f"{v}-s{s}", v, s, k, records_per_prompt=False) for s, k in enumerate(hits)]
            for v, hits in GCD.items()}
    table = build_table(data(arms))
    d = next(r for r in table.rows if r.key == "acc/gcd").vs_baseline["sdpo"]
    ref = difference(np.array(GCD["sdpo"]) / PROMPTS, np.array(GCD["grpo"]) / PROMPTS)
    assert (d.low, d.high, d.p_welch) == pytest.approx((ref.low, ref.high, ref.p_welch))
    assert math.isnan(d.boot_low) and table.paired_rows == 0
    html = write_compare([p for c in arms.values() for p in c], tmp_path / "c.html").read_text()
    assert "No per-prompt records" in html


def test_records_of_other_prompts_are_not_paired(study):
    other = study["sdpo"][0] / per_prompt.file_name(1, 10)
    record = json.loads(other.read_text())
    record["domains"]["gcd"]["prompts_sha256"] = "q" * 64  # scored on another eval set
    other.write_text(json.dumps(record))
    rows = {r.key: r for r in build_table(data(study)).rows}
    assert math.isnan(rows["acc/gcd"].vs_baseline["sdpo"].boot_low)
    assert not math.isnan(rows["acc/sorting"].vs_baseline["sdpo"].boot_low)


def test_compare_html_shows_the_table_and_the_baseline(study, tmp_path):
    cells = [p for c in study.values() for p in c]
    text = write_compare(cells, tmp_path / "cmp.html", baseline="sdpo").read_text()
    assert "Statistics over seeds" in text and "baseline <b>sdpo</b>" in text
    assert ">lower</span>" in text  # grpo against sdpo on gcd
    assert "final accuracy: gcd" in text
    # one line against the baseline per number: averages (all, trained), gcd, sorting, response KL
    assert format_text(build_table(data(study))).count("vs grpo:") == 5


def test_unknown_baseline_is_one_line_and_exit_2(study, tmp_path, cli):
    from cptlab.study import run_study
    from helpers import assert_one_line_error

    cells = [str(p) for c in study.values() for p in c]
    assert_one_line_error(cli("compare", *cells, "--out", tmp_path / "c.html", "--baseline", "nope"),
                          "--baseline", "grpo, sdpo")
    mini = tmp_path / "mini.yaml"
    mini.write_text("question: q\npreset: smoke\nseeds: [0]\nvariants:\n  grpo: [method.name=grpo]\n")
    with pytest.raises(ConfigError, match="--baseline"):  # refused before any cell runs
        run_study(str(mini), str(tmp_path / "runs"), baseline="sft")
    assert not (tmp_path / "runs").exists()


def test_summary_is_rebuilt_from_records_whatever_summary_json_says(tmp_path):
    """Reports read metrics.jsonl, the source of truth: a summary.json on disk (stale, or from an older
    cptlab whose `mean_forgetting` meant the base-row forgetting) never replaces a number built afresh."""
    from cptlab.analysis.summary import build_summary
    from cptlab.runview import load_run
    from helpers import make_run

    run = make_run(tmp_path / "old", summary={"mean_forgetting": 0.99, "headline": ["kept"]})
    fresh = build_summary(read_jsonl(run / "metrics.jsonl"))
    assert fresh["mean_forgetting"] != 0.99
    assert load_run(run).summary == fresh
    (run / "summary.json").write_text(json.dumps({"metrics_version": 2, "mean_forgetting": 0.99}))
    assert load_run(run).summary["mean_forgetting"] == fresh["mean_forgetting"]
