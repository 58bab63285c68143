"""Reliability (issue 20): one run per directory, nothing left behind by a refused run, summaries and
reports of runs with unevaluated domains, bad inputs refused up front, the fault's true step, drift
after a mid-stage resume, strict JSON and thread-independent drift.

Same conventions as test_reliability.py (helpers.py and conftest.py hold what both use): the smoke preset
shrunk to seconds, one torch thread.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cptlab.basemodel
from cptlab.analysis.drift import parameter_drift
from cptlab.config import load_config
from cptlab.api import run_continual
from cptlab.runview import load_run as read_run
from cptlab.errors import ConfigError, UserError
from cptlab.models import build_tiny_model, build_tokenizer
from cptlab.store import RunStore
from helpers import TINY, assert_one_line_error, one_error_line, records, run_until_crash, tiny_config, tree_bytes

SFT = "stages=[{domain: arithmetic, steps: 3, method: {name: sft}}]"


def strict_loads(line: str):
    """json.loads as jq reads it: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


# -- 1. one run per directory ---------------------------------------------------------------------------

# The `cptlab` command with its imports done (and the config code warmed up) first, then held until the
# test says go: both processes reach the run directory some milliseconds apart, not the seconds their
# imports would put between them (before the lock, half of such pairs corrupted the directory).
STARTER = ("import sys, cptlab.cli, cptlab.config, cptlab.continual; cptlab.config.load_config('smoke'); "
           "print('ready', file=sys.stderr, flush=True); sys.stdin.readline(); sys.argv[0] = 'cptlab'; cptlab.cli.main()")


@pytest.mark.slow
def test_two_runs_started_together_into_one_directory_one_is_refused(tmp_path):
    """Two real `cptlab run` processes into one --out, started together, several times: one finishes,
    the other exits 2 with one line, and the directory holds exactly the winner's run."""
    stages = "stages=[{domain: arithmetic, steps: 3}]"  # with the smoke preset's checkpoint every 2 steps
    reference = run_continual(tiny_config(stages, "run.name=ref"), out_dir=tmp_path / "ref")
    env = {**os.environ, "CPTLAB_NUM_THREADS": "1"}
    for trial in range(4):
        out = tmp_path / f"t{trial}"
        procs = {name: subprocess.Popen([sys.executable, "-c", STARTER, "run", "smoke", *TINY, stages,
                                         f"run.name={name}", "--out", str(out)], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                 for name in ("first", "second")}
        for p in procs.values():
            assert p.stderr.readline().strip() == "ready"
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        results = {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in procs.items()}
        codes = sorted(code for code, _ in results.values())
        assert codes == [0, 2], results
        winner = next(name for name, (code, _) in results.items() if code == 0)
        err = next(e for code, e in results.values() if code == 2)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(out) in lines[0] and ("is in use by" in lines[0] or "already exists" in lines[0]), lines[0]
        # intact: the winner's config, summary and records, exactly once, as an undisturbed run wrote them
        assert yaml.safe_load((out / "config.yaml").read_text())["run"]["name"] == winner
        assert json.loads((out / "summary.json").read_text())["name"] == winner
        got, want = records(out), records(reference)
        assert got[0].pop("name") == winner and want[0].pop("name") == "ref"
        assert got == want


def test_a_claimed_run_directory_is_refused_for_run_resume_and_overwrite(tmp_path, cli):
    out = run_continual(tiny_config(SFT), out_dir=tmp_path / "run")
    holder = RunStore.open(out)
    holder.claim()  # stands in for a run that is writing the directory right now
    before = tree_bytes(out)
    try:
        for args in (["run", "--resume", out], ["run", "smoke", *TINY, "--out", out, "--overwrite"]):
            result = cli(*args)
            assert result.exit_code == 2, result.output
            line = one_error_line(result)
            assert f"'{out}' is in use by process {os.getpid()}" in line, line
        assert tree_bytes(out) == before  # not a byte changed
    finally:
        holder.release()
    result = cli("run", "smoke", *TINY, SFT, "--out", out, "--overwrite")  # released: the directory is free
    assert result.exit_code == 0, result.output


def test_a_killed_run_leaves_no_stale_claim(tmp_path):
    root = tmp_path / "run"
    RunStore.create(root, {"run": {"name": "x"}}).close()
    code = f"from cptlab.store import RunStore; s = RunStore.open({str(root)!r}); s.claim(); print('held', flush=True); " \
           "import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {proc.pid}"):
            RunStore.open(root).claim()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    store = RunStore.open(root)
    store.claim()  # the kernel released the dead process's lock
    store.close()


# -- 4. a run refused late leaves nothing behind ------------------------------------------------------

def test_missing_model_path_is_refused_before_the_directory_is_made(tmp_path, cli):
    out = tmp_path / "run"
    result = cli("run", "smoke", *TINY, SFT, f"model.path={tmp_path / 'nope'}", "--out", out)
    assert result.exit_code == 2, result.output
    assert "model.path" in one_error_line(result)
    assert not out.exists()


def test_a_refusal_during_setup_removes_the_directory_it_made(tmp_path, cli):
    out = tmp_path / "run"
    bad_lora = ["model.lora.rank=2", "model.lora.target_modules=[no_such_layer]"]  # found only on the built model
    result = cli("run", "smoke", *TINY, SFT, *bad_lora, "--out", out)
    assert result.exit_code == 2, result.output
    assert "model.lora.target_modules" in one_error_line(result)
    assert not out.exists()
    # a directory that existed (empty) is kept, emptied of what the refused run wrote
    out.mkdir()
    assert cli("run", "smoke", *TINY, SFT, *bad_lora, "--out", out).exit_code == 2
    assert out.is_dir() and list(out.iterdir()) == []
    # so the corrected command is not refused as "already exists"
    result = cli("run", "smoke", *TINY, SFT, "--out", out)
    assert result.exit_code == 0, result.output


# -- 2. summary, report and compare of a run that trained ------------------------------------------------

@pytest.fixture(scope="module")
def unevaluated(tmp_path_factory) -> Path:
    """Stage 2 trains sorting, which eval.domains leaves out (the README's eval.domains=[gcd,gcd_ood] case);
    the run's name holds mathtext."""
    cfg = tiny_config("stages=[{domain: arithmetic, steps: 1}, {domain: sorting, steps: 1}]", "run.report=true",
               "run.name=cost$_$x")
    return run_continual(cfg, out_dir=tmp_path_factory.mktemp("uneval") / "run")


def test_a_trained_domain_that_is_not_evaluated_gives_summary_and_report(unevaluated, cli):
    summary = json.loads((unevaluated / "summary.json").read_text())
    assert summary["complete"] and summary["domains"] == ["arithmetic", "sorting"]
    assert summary["accuracy_matrix"][2][1] is None and summary["in_domain_gain"][1] is None
    assert "Trained but not evaluated (not in eval.domains): sorting." in summary["headline"]
    assert any(h.startswith("Stage 2: GRPO on sorting (sorting not evaluated)") for h in summary["headline"])
    assert "Base model: mean greedy accuracy" in summary["headline"][0] and "over 1 evaluated domain." in summary["headline"][0]
    html = (unevaluated / "report.html").read_text()
    assert html.count("not evaluated") >= 5  # the sorting row (4 cells), stage 2's gain, the matrix note
    (unevaluated / "report.html").unlink()
    result = cli("report", unevaluated)
    assert result.exit_code == 0, result.output
    assert (unevaluated / "report.html").read_text().count("not evaluated") >= 5


def test_compare_draws_a_run_name_with_dollars_as_text(unevaluated, cli, tmp_path):
    from cptlab import plots

    plots.lines_by_run([("a$_$b", "#1f77b4", [0, 1], [1.0, 2.0])], "x", "y")  # mathtext would fail on "$_$"
    result = cli("compare", unevaluated, "-o", tmp_path / "c.html")
    assert result.exit_code == 0, result.output
    assert "cost$_$x" in (tmp_path / "c.html").read_text()


def test_compare_warns_when_runs_trained_other_domains(unevaluated, cli, tmp_path):
    """Two real runs on one base and one eval set, trained on other domains: one warning line naming
    the trained domains (and nothing about the base or the prompts, which they share), the same in
    the page, and the headline table in the terminal."""
    other = run_continual(tiny_config("stages=[{domain: sorting, steps: 1}]", "run.name=other"),
                          out_dir=str(tmp_path / "other"))
    result = cli("compare", unevaluated, other, "-o", tmp_path / "c.html")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("cptlab: warning: the runs differ in trained domains ")
    assert "cost$_$x: arithmetic→sorting; other: sorting" in warning[0]
    for shared in ("base model", "evaluated domains", "eval prompts"):  # one seed, one eval set
        assert shared not in warning[0]
    page = (tmp_path / "c.html").read_text()
    assert "not like for like" in page and "cost$_$x: arithmetic→sorting; other: sorting" in page
    rows = {words[0]: words for words in map(str.split, result.stdout.splitlines())
            if words[:1] in (["cost$_$x"], ["other"])}
    acc = {r: 100 * np.nanmean(read_run(d).R[-1]) for r, d in (("cost$_$x", unevaluated), ("other", other))}
    assert rows["cost$_$x"][1:3] == ["1", f"{acc['cost$_$x']:.1f}"] and rows["other"][2] == f"{acc['other']:.1f}"
    assert rows["cost$_$x"][-1] == "baseline"


# -- 3. bad inputs refused up front ------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, needle", [
    ("method.lr=.inf", "method.lr", "finite"),
    ("method.lr=.nan", "method.lr", "finite"),
    ("rollout.temperature=.inf", "rollout.temperature", "finite"),
    ("model.lora.alpha=-.inf", "model.lora.alpha", "finite"),
    ("method.sdpo.success_threshold=.nan", "method.sdpo.reprompt.success_threshold (method.sdpo.success_threshold)",
     "finite"),
    ("stages=[{domain: arithmetic, steps: 2, method: {lr: .inf}}]", "stages[0].method.lr", "finite"),
    ("warmup.domains=[]", "warmup.domains", "non-empty"),
    ("stages=[]", "stages", "non-empty"),
    ("eval.domains=[]", "eval.domains", "non-empty"),
    ("prompt.question_template=Q: {question} {x}", "prompt.question_template", "unknown slot {x}"),
    ("prompt.question_template=Q: {question", "prompt.question_template", "does not parse"),
    ("prompt.reprompt_template={prompt}{}", "prompt.reprompt_template", "unknown slot {}"),
    ("prompt.solution_template=Demo: {solution} {feedback}", "prompt.solution_template", "unknown slot {feedback}"),
    ("prompt.feedback_template=F {feedback:d}", "prompt.feedback_template", "does not parse"),
    ("eval.save_samples=-1", "eval.save_samples", ">= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens", ">= 1"),
    ("eval.probe_per_domain=0", "eval.probe_per_domain", ">= 1"),
    ("method.weight_decay=-0.1", "method.weight_decay", ">= 0"),
    ("warmup.weight_decay=-1", "warmup.weight_decay", ">= 0"),
    ("warmup.warmup_steps=-3", "warmup.warmup_steps", ">= 0"),
])
def test_bad_values_are_refused_naming_the_field(override, field, needle):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [override])
    assert info.value.field == field and needle in str(info.value), str(info.value)


def test_templates_with_literal_braces_and_every_slot_are_accepted():
    cfg = load_config("smoke", ["prompt.question_template=Solve {{x}} = {question}",
                                "prompt.reprompt_template={feedback}{solution}{prompt}"])
    assert cfg.prompt.question_template.format(question="1+1") == "Solve {x} = 1+1"
    assert cfg.prompt.reprompt_template == "{feedback}{solution}{prompt}"
    load_config("smoke", ["warmup.enabled=false", "warmup.domains=[]", "eval.drift=false", "eval.probe_per_domain=0"])


def test_unwritable_cache_dir_is_refused_before_the_warmup(tmp_path, cli, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")

    def no_warmup(*args, **kwargs):
        raise AssertionError("the warm-up ran before the cache directory was checked")

    monkeypatch.setattr(cptlab.basemodel, "run_warmup", no_warmup)
    out = tmp_path / "run"
    result = cli("run", "smoke", "warmup.steps=2", f"warmup.cache_dir={blocker / 'cache'}", "--out", out)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "warmup.cache_dir" in line and str(blocker) in line, line
    assert not out.exists()


def test_report_of_a_corrupt_config_or_of_a_non_run_directory_is_one_line(tmp_path, cli):
    out = run_continual(tiny_config(SFT), out_dir=tmp_path / "run")
    summary = (out / "summary.json").read_bytes()
    (out / "config.yaml").write_text("run: {name: [x\n")
    result = cli("report", out)
    assert result.exit_code == 2, result.output
    assert f"{out / 'config.yaml'}: not valid YAML" in one_error_line(result)
    assert (out / "summary.json").read_bytes() == summary  # refused before anything was rewritten
    result = cli("report", tmp_path)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "not a run directory" in line and "--resume" not in line, line


# -- 5. a numerical fault: one line, the true step -------------------------------------------------------

def test_nan_fault_is_one_line_and_names_its_global_step(tmp_path, cli):
    """The command, a second-stage learning rate that blows the weights up: step 1 of stage 2
    (global step 3) makes them infinite, its step 2 (global step 4) has a NaN loss."""
    out = tmp_path / "run"
    stages = ("stages=[{domain: arithmetic, steps: 2, method: {name: sft}}, "
              "{domain: arithmetic, steps: 3, method: {name: sft, lr: 1.0e+30}}]")
    assert_one_line_error(cli("run", "smoke", *TINY, stages, "run.report=true", "--out", out),
                          "stage 2 (arithmetic, sft) step 2 of 3: loss is nan", code=3)
    recs = records(out)
    assert [r["global_step"] for r in recs if r["event"] == "train"] == [1, 2, 3]
    (fault,) = [r for r in recs if r["event"] == "fault"]
    assert (fault["stage"], fault["step"], fault["global_step"], fault["action"]) == (2, 2, 4, "stopped")
    assert "Fault in stage 2 at global step 4:" in (out / "report.html").read_text()


# -- 6 and 7. drift after a mid-stage resume; strict JSON ----------------------------------------------------

DRIFT = ["eval.drift=true", "eval.probe_per_domain=2", "run.checkpoint_every=2", "run.keep_checkpoints=1",
         "stages=[{domain: arithmetic, steps: 2, method: {name: sft}}, {domain: arithmetic, steps: 4, method: {name: sft}}]"]


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(uninterrupted, killed in stage 2 after its step-2 checkpoint and resumed)."""
    full = run_continual(tiny_config(*DRIFT), out_dir=tmp_path_factory.mktemp("drift") / "full")
    resumed = tmp_path_factory.mktemp("drift") / "resumed"
    run_until_crash(tiny_config(*DRIFT), resumed, stage=2, step=3)
    assert RunStore.open(resumed).checkpoint_dirs()[-1].name == "stage2-step2"
    run_continual(resume=str(resumed))
    return full, resumed


def test_drift_after_a_mid_stage_resume_equals_the_uninterrupted_run(drift_runs):
    full, resumed = drift_runs
    want = [r for r in records(full) if r["event"] == "drift"]
    got = [r for r in records(resumed) if r["event"] == "drift"]
    assert [r["stage"] for r in got] == [0, 1, 2]
    assert "param/rel_l2_prev" in got[2] and got[2]["param/rel_l2_prev"] > 0
    assert got == want  # every field, every value
    # the stage-end checkpoint that made it possible is kept beside keep_checkpoints=1 (and stage 1's end,
    # by run.keep_stage_models, auto: on for a model this small)
    assert [d.name for d in RunStore.open(full).checkpoint_dirs()] == ["stage1-step2", "stage2-step4"]


def test_drift_records_hold_their_families_and_seconds_by_phase(drift_runs):
    from cptlab import metric_names as N

    full, _ = drift_runs
    drift = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines() if f'"{N.DRIFT}"' in x]
    assert [r["stage"] for r in drift] == [0, 1, 2]
    for r in drift:
        families = {k.split("/")[0] for k in r if "/" in k and not N.is_timing(k)}
        assert families <= set(N.DRIFT_FAMILIES) and {"param", "response", "artifacts"} <= families
        phases = {k: r[k] for k in r if N.is_timing(k) and k != "seconds"}
        assert set(phases) == {"seconds/param", "seconds/response", "seconds/general"}
        assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= r["seconds"] + 1e-6


def test_every_json_file_is_strict_and_nan_is_written_as_null(drift_runs):
    full, _ = drift_runs
    lines = (full / "metrics.jsonl").read_text().splitlines()
    recs = [strict_loads(line) for line in lines]
    base_drift = next(r for r in recs if r["event"] == "drift" and r["stage"] == 0)
    assert base_drift["param/effective_rank"] is None  # no update yet: NaN, written as null
    for path in [full / "summary.json", *sorted((full / "samples").glob("*.json"))]:
        strict_loads(path.read_text())


def test_an_older_run_with_bare_nan_still_reports(drift_runs, tmp_path, cli):
    import shutil

    old = Path(shutil.copytree(drift_runs[0], tmp_path / "old"))
    text = (old / "metrics.jsonl").read_text()
    assert ': null' in text
    (old / "metrics.jsonl").write_text(text.replace(": null", ": NaN"))  # as older versions wrote it
    result = cli("report", old)
    assert result.exit_code == 0, result.output
    assert json.loads((old / "summary.json").read_text())["drift"] == \
        json.loads((drift_runs[0] / "summary.json").read_text())["drift"]


def test_store_log_writes_null_for_every_kind_of_non_finite_number(tmp_path):
    store = RunStore.create(tmp_path / "r", {"run": {"name": "x"}})
    store.log("x", a=float("nan"), b=np.float32("inf"), c=torch.tensor(float("-inf")), d=[1.5, float("nan")],
              e=np.int64(3), f={"g": np.float64("nan")})
    store.close()
    assert strict_loads(store.metrics_path.read_text()) == {"event": "x", "a": None, "b": None, "c": None,
                                                          "d": [1.5, None], "e": 3, "f": {"g": None}}


# -- 8. drift does not depend on the thread count ------------------------------------------------------------

def test_parameter_drift_is_bitwise_equal_on_one_and_two_threads():
    cfg = load_config("tiny")  # hidden 96: eigh of these sizes differed in the last digit (1 vs 2 threads)
    base = {k: v.detach().clone() for k, v in build_tiny_model(cfg.model, build_tokenizer(), seed=0).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    current = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    previous = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    before, out = torch.get_num_threads(), {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[n] = parameter_drift(base, current, previous)
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert not math.isnan(out[1]["effective_rank"]) and not math.isnan(out[1]["subspace_overlap"])
    assert {k: v.hex() for k, v in out[1].items()} == {k: v.hex() for k, v in out[2].items()}
