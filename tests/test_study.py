"""Study presets load and validate; a study runs its grid, writes the comparison and skips finished cells."""

import json

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
