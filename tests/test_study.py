"""Study presets load and validate; a study runs its grid, writes the comparison and skips finished cells."""

import json
from pathlib import Path

import pytest

from cptlab.config import ConfigError, UserError
from cptlab.study import load_study, run_study, select_variants, study_names

SIX = {"teacher_stability", "cot", "ood", "continual", "drift", "collapse"}


def test_every_study_question_has_a_cpu_and_a_gpu_preset():
    names = set(study_names())
    assert SIX <= names and {f"{n}_gpu" for n in SIX} <= names
    assert {"stable_gamma", "stable_gamma_gpu"} <= names  # StableSDPO's gamma sweep (issue 15)
    for name in names:
        study = load_study(name)  # validates every cell's config
        assert study.question and len(study.variants) >= 2


def test_bad_study_variant_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: smoke\nvariants:\n  a: [method.name=dpo]\n")
    with pytest.raises(ConfigError, match="method.name"):
        load_study(str(bad))
    with pytest.raises(UserError, match="unknown study 'no_such_study'"):
        load_study("no_such_study")


def test_variants_select_a_subset_in_study_order_and_unknown_names_are_refused():
    study = load_study("ood_gpu")
    assert list(select_variants(study, None)) == list(study.variants)
    assert list(select_variants(study, ["sft", "grpo"])) == ["grpo", "sft"]
    with pytest.raises(ConfigError, match="--variants.*sdpo_frozen"):
        select_variants(study, ["grpo", "nope"])


@pytest.mark.slow
def test_study_runs_grid_writes_compare_and_skips_finished_cells(tmp_path):
    study = tmp_path / "mini.yaml"
    study.write_text(
        "question: smallest grid\npreset: smoke\nseeds: [0]\n"
        "overrides: [\"stages=[{domain: arithmetic, steps: 2}]\", eval.every=0, run.checkpoint_every=0]\n"
        "variants:\n  grpo: [method.name=grpo]\n  sft: [method.name=sft]\n")
    out = run_study(str(study), str(tmp_path / "runs"))
    root = tmp_path / "runs" / "mini"
    assert out == root / "compare.html" and out.stat().st_size > 1000
    cells = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert cells == ["grpo-s0", "sft-s0"]
    for cell in cells:
        summary = json.loads((root / cell / "summary.json").read_text())
        assert summary["complete"] and len(summary["accuracy_matrix"]) == 2
    # the comparison computed each cell's domain distances from its base model and plotted forgetting on them
    assert all((root / cell / "distance.json").exists() for cell in cells)
    assert "Forgetting against domain distance" in out.read_text()
    before = (root / "grpo-s0" / "metrics.jsonl").read_text()
    run_study(str(study), str(tmp_path / "runs"))  # finished cells are skipped, not rerun
    assert (root / "grpo-s0" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_parallel_study_runs_cells_as_processes_with_their_logs(tmp_path):
    study = tmp_path / "par.yaml"
    study.write_text(
        "question: parallel\npreset: smoke\nseeds: [0]\n"
        "overrides: [\"stages=[{domain: arithmetic, steps: 2}]\", eval.every=0, run.checkpoint_every=0]\n"
        "variants:\n  grpo: [method.name=grpo]\n  sft: [method.name=sft]\n")
    out = run_study(str(study), str(tmp_path / "runs"), seeds=[0, 1], jobs=2, variants=["grpo"])
    root = tmp_path / "runs" / "par"
    assert out.exists()
    for cell in ("grpo-s0", "grpo-s1"):
        assert json.loads((root / cell / "summary.json").read_text())["complete"]
        assert (root / f"{cell}.log").exists()
    assert not (root / "sft-s0").exists()  # only the variant asked for
    seeds = [json.loads((root / c / "metrics.jsonl").read_text().splitlines()[0]) for c in ("grpo-s0", "grpo-s1")]
    assert seeds[0]["name"] == "grpo-s0" and seeds[1]["name"] == "grpo-s1"


def test_cells_are_spread_over_the_gpus_fewest_cells_first(tmp_path, monkeypatch):
    import subprocess
    import time
    from types import SimpleNamespace

    from cptlab import study as S

    started, hold = [], {"until": 3}

    class FakeProc:
        def __init__(self, cmd, stdout, stderr, env):
            started.append(env.get("CUDA_VISIBLE_DEVICES"))
            self.returncode = 0

        def poll(self):  # every cell runs until `until` cells have started
            return 0 if len(started) >= hold["until"] else None

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    queue = [(tmp_path / f"c{i}", ["method.name=grpo"]) for i in range(4)]
    S._schedule(SimpleNamespace(preset="smoke"), "t", tmp_path, queue, [], [], 3, {}, ["0", "1"])
    assert started == ["0", "1", "0", "0"]  # the 4th starts after all three ended: GPU 0 is free again
    started.clear()
    hold["until"] = 1
    S._schedule(SimpleNamespace(preset="smoke"), "t", tmp_path, [(tmp_path / "d", [])], [], [], 2, {}, ["3"])
    assert started == [None]  # one GPU: the environment is left alone


# -- --launcher submitit (submit.py), through submitit's local executor: no cluster needed ---------------

TINY_STUDY = (
    "question: submitit grid\npreset: smoke\nseeds: [0]\n"
    "overrides: [\"stages=[{domain: arithmetic, steps: 2}]\", eval.every=0, run.checkpoint_every=0, "
    "warmup.steps=6, warmup.examples_per_domain=40, \"eval.domains=[arithmetic]\", eval.num_prompts=4, "
    "eval.num_samples=1, eval.probe_per_domain=2, method.prompts_per_step=2, rollout.group_size=2, "
    "rollout.max_new_tokens=8]\n"
    "variants:\n  grpo: [method.name=grpo]\n  sft: [method.name=sft]\n")
TIMING = ("seconds", "time", "second", "per_second", "wall", "started", "finished", "timestamp")


def _comparable(cell):
    """A cell's metrics records without what depends on the clock or the run directory's path."""
    from cptlab.store import read_jsonl

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if not any(t in k for t in TIMING) and k not in ("path", "out_dir", "run_dir")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    def flat(x, key=""):  # nested records -> {dotted key: leaf}, which pytest.approx compares
        if isinstance(x, dict):
            return {k2: v for k, v in x.items() for k2, v in flat(v, f"{key}.{k}").items()}
        if isinstance(x, list):
            return {k2: v for i, v in enumerate(x) for k2, v in flat(v, f"{key}[{i}]").items()}
        return {key: x}

    return flat([clean(r) for r in read_jsonl(cell / "metrics.jsonl")])


@pytest.mark.slow
def test_submitit_local_cells_equal_an_in_process_run_and_rerun_resumes_only_unfinished(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from cptlab import submit

    monkeypatch.setattr(submit, "POLL_SECONDS", 0.2)
    study = tmp_path / "sub.yaml"
    study.write_text(TINY_STUDY)
    slurm = dict(cluster="local", gpus_per_cell=0, time_min=10)
    run_study(str(study), str(tmp_path / "a"), launcher="submitit", slurm=slurm)
    run_study(str(study), str(tmp_path / "b"), jobs=1)  # the same cells in this process
    a, b = tmp_path / "a" / "sub", tmp_path / "b" / "sub"
    assert (a / "compare.html").stat().st_size > 1000
    for cell in ("grpo-s0", "sft-s0"):
        summary = json.loads((a / cell / "summary.json").read_text())
        assert summary["complete"]
        assert json.loads((b / cell / "summary.json").read_text())["accuracy_matrix"] == summary["accuracy_matrix"]
        # same seeds, same metrics (to 1e-9: the drift probe's SVD angles near 0 vary with LAPACK's threads)
        assert _comparable(a / cell) == pytest.approx(_comparable(b / cell), rel=1e-9, abs=1e-9)
        record = submit.record_of(a, a / cell)
        assert record["cluster"] == "local" and Path(record["stdout"]).exists()
    jobs_before = {c: submit.record_of(a, a / c)["job_id"] for c in ("grpo-s0", "sft-s0")}
    # a cell whose run stopped before its end (no summary yet) is resubmitted and resumed; the finished
    # one is skipped (no new job)
    metrics = (a / "sft-s0" / "metrics.jsonl").read_text()
    (a / "sft-s0" / "summary.json").unlink()
    run_study(str(study), str(tmp_path / "a"), launcher="submitit", slurm=slurm)
    assert submit.record_of(a, a / "grpo-s0")["job_id"] == jobs_before["grpo-s0"]
    assert submit.record_of(a, a / "sft-s0")["job_id"] != jobs_before["sft-s0"]
    assert json.loads((a / "sft-s0" / "summary.json").read_text())["complete"]
    assert (a / "sft-s0" / "metrics.jsonl").read_text() == metrics  # resumed a finished run: nothing changed


def test_submitit_missing_is_one_line_naming_the_extra_before_any_work(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    study = tmp_path / "sub.yaml"
    study.write_text(TINY_STUDY)
    with pytest.raises(UserError, match=r"pip install cptlab\[cluster\]"):
        run_study(str(study), str(tmp_path / "runs"), launcher="submitit")
    assert not (tmp_path / "runs").exists()


def test_cli_without_submitit_exits_2_with_one_line(tmp_path, monkeypatch, cli):
    import sys

    from helpers import assert_one_line_error

    monkeypatch.setitem(sys.modules, "submitit", None)
    result = cli("study", "ood", "--launcher", "submitit", "--out", tmp_path / "runs")
    assert_one_line_error(result, "--launcher submitit", "pip install cptlab[cluster]")
    assert not (tmp_path / "runs").exists()


def test_launcher_and_slurm_settings_are_checked_and_the_cli_overrides_the_study(tmp_path):
    from cptlab.study import _slurm_config

    study = tmp_path / "s.yaml"
    study.write_text(TINY_STUDY + "slurm: {partition: gpu, gpus_per_cell: 2, time_min: 60}\n")
    loaded = load_study(str(study))
    assert (loaded.slurm.partition, loaded.slurm.gpus_per_cell, loaded.slurm.time_min) == ("gpu", 2, 60)
    cfg = _slurm_config(loaded, dict(partition="h100", gpus_per_cell=None, time_min=30))
    assert (cfg.partition, cfg.gpus_per_cell, cfg.time_min, cfg.cpus_per_cell) == ("h100", 2, 30, 8)
    with pytest.raises(ConfigError, match="time_min.*--time-min"):
        _slurm_config(loaded, dict(time_min=0))
    with pytest.raises(ConfigError, match="--launcher"):
        run_study(str(study), str(tmp_path / "r"), launcher="ray")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_STUDY + "slurm: {gpu: 1}\n")
    with pytest.raises(ConfigError, match="study.slurm.gpu"):
        load_study(str(bad))


def test_submitit_executor_gets_the_slurm_settings(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import os

    from cptlab.submit import SlurmConfig, make_executor

    with pytest.raises(ConfigError, match="study.slurm.cluster.*srun"):  # no Slurm on this machine
        make_executor(SlurmConfig(cluster="slurm"), tmp_path / "%j")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")  # what submitit checks for Slurm
    cfg = SlurmConfig(cluster="slurm", partition="gpu", gpus_per_cell=2, cpus_per_cell=16, time_min=90, mem_gb=64,
                      setup=["module load cuda"], additional={"account": "proj42"})
    executor, cluster = make_executor(cfg, tmp_path / "%j")
    p = executor._executor.parameters
    assert cluster == "slurm"
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["time"], p["mem"]) == ("gpu", 2, 16, 90, "64GB")
    assert p["setup"] == ["module load cuda"] and p["additional_parameters"] == {"account": "proj42"}
    local, cluster = make_executor(SlurmConfig(cluster="local", gpus_per_cell=0, time_min=7), tmp_path / "%j")
    assert cluster == "local" and local._executor.parameters["timeout_min"] == 7


def test_base_model_is_built_once_only_where_cells_would_each_build_it(tmp_path):
    from cptlab.config import load_config
    from cptlab.submit import needs_base_job

    assert not needs_base_job(load_config("smoke"))  # no warm-up cache: each run warms up its own
    cached = load_config("smoke", [f"warmup.cache_dir={tmp_path}"])
    assert needs_base_job(cached)
    from cptlab.warmup import cache_path

    (cache_path(cached)).mkdir(parents=True)
    (cache_path(cached) / "config.json").write_text("{}")
    assert not needs_base_job(cached)  # already cached


def test_a_cell_whose_earlier_job_still_runs_is_waited_for_not_submitted_again(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import subprocess
    import sys

    from cptlab import submit

    monkeypatch.setattr(submit, "POLL_SECONDS", 0.05)
    root, cell = tmp_path / "s", tmp_path / "s" / "grpo-s0"
    cell.mkdir(parents=True)
    # a local "job" of an earlier run: a process whose command line names submitit, alive for a moment
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(1.5)", "submitit"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"  # its command line is its own now (not its parent's)
    record = dict(job_id=str(proc.pid), cluster="local", folder=str(tmp_path), stdout="o", stderr="e")
    (root / "grpo-s0.job.json").write_text(json.dumps(record))
    submitted, said = [], []

    class Executor:
        def submit(self, *args):
            submitted.append(args)
            raise AssertionError("submitted again")

    monkeypatch.setattr(submit, "make_executor", lambda cfg, folder: (Executor(), "local"))
    try:
        with pytest.raises(UserError, match="grpo-s0"):  # the job ended without finishing the cell
            submit.run_cells("smoke", "s", root, [(cell, [])], submit.SlurmConfig(cluster="local"), None, said.append)
    finally:
        proc.wait()
    assert submitted == [] and any("still queued or running" in line for line in said)
    # once that process is gone, the record no longer holds the cell back
    assert submit._still_running(root, cell) is None
