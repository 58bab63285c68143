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
from cptlab.analysis.compare import RunData, build_table, format_text, verdict_text
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
    # 5 differences, three of them with Welch p 0.0106 (gcd and the two averages it drives): Holm p = 5 x 0.0106,
    # above 0.05 -> the adjusted verdict is inconclusive, the 95% one "higher"
    assert "final accuracy: gcd" in text and "vs grpo: +10.7" in text and "Holm p=0.053" in text
    assert "-> inconclusive (higher at 95%)" in text


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
    assert ">inconclusive (lower at 95%)</span>" in text  # grpo against sdpo on gcd, after Holm's adjustment
    assert "Holm-adjusted interval (level)" in text and "99.00%" in text
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


def test_holm_adjustment_over_the_table(study, tmp_path):
    """Every difference of the table is one test of one family: Holm p, the interval at the row's Holm
    level (the same difference recomputed at that level) and the verdict read from it."""
    table = build_table(data(study))
    assert table.family_size == 5  # 2 averages, 2 domains, the response KL; one arm against the baseline
    rows = {r.key: r for r in table.rows}
    gcd = rows["acc/gcd"]
    p = gcd.vs_baseline["sdpo"].p_welch
    # p values (p, p, p, 1, 1): rank 1's alpha 0.05/5 = 0.01 < p, so Holm stops there: every row at 99%,
    # adjusted p = max_j (5 - j + 1) p_(j) = 5p for the three equal ones
    assert 0.01 < p < 0.05 / 4 and gcd.p_holm["sdpo"] == pytest.approx(5 * p)
    assert all(r.holm_level["sdpo"] == pytest.approx(0.99) for r in table.rows)
    assert rows["acc/sorting"].p_holm["sdpo"] == 1.0
    ref = difference(np.array(GCD["sdpo"]) / PROMPTS, np.array(GCD["grpo"]) / PROMPTS, level=0.99)
    adj = gcd.adjusted["sdpo"]
    assert adj.welch_low == pytest.approx(ref.welch_low) and adj.low <= ref.welch_low < 0
    # a clear gap survives the adjustment
    far = {"grpo": [25, 26, 27], "sdpo": [45, 46, 47]}
    arms = {v: [write_run(tmp_path / "far" / f"{v}-s{s}", v, s, k) for s, k in enumerate(hits)]
            for v, hits in far.items()}
    far_table = build_table(data(arms))
    far_gcd = next(r for r in far_table.rows if r.key == "acc/gcd")
    assert far_gcd.p_holm["sdpo"] < 0.05 and far_gcd.adjusted["sdpo"].low > 0
    assert "-> higher" in format_text(far_table)


# -- not like for like: base model, domains, eval prompts ----------------------------------------------

def with_base(run: Path, config: dict | None = None, **base) -> RunData:
    """The run as `mismatches` reads it, its run_start's base info replaced by `base`."""
    records = read_jsonl(run / "metrics.jsonl")
    records[0] = {**records[0], "base": base}
    return RunData(run.name, run, records, config or {})


def test_mismatches_name_what_differs_and_nothing_else(study, tmp_path):
    from cptlab.analysis.compare import mismatch_line, mismatches
    from helpers import make_run

    a, b = study["grpo"][0], study["sdpo"][0]
    assert mismatches({"a": with_base(a, weights_sha256="1" * 64), "b": with_base(b, weights_sha256="1" * 64)}) == []
    found = mismatches({"a": with_base(a, weights_sha256="1" * 64), "b": with_base(b, weights_sha256="2" * 64)})
    assert [(m.topic, m.detail) for m in found] == [("base model", "a: weights 11111111; b: weights 22222222")]
    # a base built from run.seed (warmup.seed: null) differs with the seed by design; from one warmup.seed it must not
    seeded = [{"warmup": {"seed": None}, "run": {"seed": s}} for s in (0, 1)]
    assert mismatches({"a": with_base(a, seeded[0], weights_sha256="1" * 64),
                       "b": with_base(b, seeded[1], weights_sha256="2" * 64)}) == []
    fixed = [{"warmup": {"seed": 0}, "run": {"seed": s}} for s in (0, 1)]
    assert mismatches({"a": with_base(a, fixed[0], weights_sha256="1" * 64),
                       "b": with_base(b, fixed[1], weights_sha256="2" * 64)})[0].topic == "base model"
    # older runs without a hash: only a different parameter count is a sure difference
    found = mismatches({"a": with_base(a, parameters=680_000), "b": with_base(b, parameters=76_000_000)})
    assert found[0].detail == "a: 0.68M parameters; b: 76.00M parameters"
    # the same prompts in name only: another eval set of gcd
    other = b / per_prompt.file_name(0, 0)
    record = json.loads(other.read_text())
    record["domains"]["gcd"]["prompts_sha256"] = "q" * 64
    other.write_text(json.dumps(record))
    found = mismatches({"a": RunData("a", a, read_jsonl(a / "metrics.jsonl")),
                        "b": RunData("b", b, read_jsonl(b / "metrics.jsonl"))})
    assert [(m.topic, m.detail) for m in found] == [("eval prompts", "gcd (a: set pppppppp; b: set qqqqqqqq)")]
    # other trained and evaluated domains
    x = make_run(tmp_path / "x", name="x", domains=("arithmetic", "sorting"), methods=("grpo", "grpo"))
    y = make_run(tmp_path / "y", name="y", domains=("arithmetic", "gcd"), methods=("grpo",))
    found = mismatches({n: RunData(n, p, read_jsonl(p / "metrics.jsonl")) for n, p in (("x", x), ("y", y))})
    assert [(m.topic, m.detail) for m in found] == [
        ("trained domains", "x: arithmetic→sorting; y: arithmetic"),
        ("evaluated domains", "x: arithmetic, sorting; y: arithmetic, gcd")]
    assert mismatch_line(found).startswith(
        "the runs differ in trained domains (x: arithmetic→sorting; y: arithmetic); evaluated domains (")
    assert mismatch_line([]) == ""
    # a variant whose runs agree is named once
    runs = {n: RunData(n, p, read_jsonl(p / "metrics.jsonl")) for n, p in (("x · seed 0", x), ("x · seed 1", x),
                                                                          ("y", y))}
    found = mismatches(runs, {"x": ["x · seed 0", "x · seed 1"], "y": ["y"]})
    assert found[0].detail == "x: arithmetic→sorting; y: arithmetic"


def test_numbers_are_shown_in_the_report_units():
    from cptlab.analysis.compare import fmt

    assert fmt(0.02588, "share") == "2.6" and fmt(0.02588, "pts", True) == "+2.6"  # % and points, as the report
    assert fmt(-0.0008, "nats") == "≈0" and fmt(0.0004, "nats") == "≈0"  # a KL estimate at noise level
    assert fmt(0.01234, "nats") == "0.012" and fmt(-0.01234, "nats", True) == "-0.012"
    assert fmt(0.0002, "nats", True) == "±0.000" and fmt(math.nan, "nats") == "–"


def test_compare_prints_the_headline_table_and_no_warning_for_like_runs(study, tmp_path, cli):
    cells = [str(p) for c in study.values() for p in c]
    result = cli("compare", *cells, "--out", tmp_path / "c.html")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ""  # one base, one set of domains and prompts: nothing to warn about
    rows = {words[0]: words for words in map(str.split, result.stdout.splitlines()) if words[:1] in (["grpo"], ["sdpo"])}
    # final average accuracy over gcd and sorting (40/50): grpo (26+40)/2/50, sdpo (31.33+40)/2/50
    assert rows["grpo"][:4] == ["grpo", "3", "66.0", "52.0"] and rows["grpo"][-1] == "baseline"
    table = build_table(data(study))
    row = next(r for r in table.rows if r.key == "avg_all")
    d = row.vs_baseline["sdpo"]
    assert rows["sdpo"][:4] == ["sdpo", "3", "71.3", "62.7"]
    # the verdict is read from the Holm-adjusted interval (the 95% one in brackets where it differs)
    assert verdict_text(row, "sdpo") == "inconclusive (higher at 95%)"
    assert " ".join(rows["sdpo"][-4:]) == f"+5.3 [{100 * d.low:+.1f}, {100 * d.high:+.1f}] inconclusive"
    assert f"comparison written to {tmp_path / 'c.html'}" in result.stdout
