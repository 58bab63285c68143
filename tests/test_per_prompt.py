"""Per-prompt evaluation records (evals/stage{S}-step{K}.json) and the base weights' hash: what they
hold, that they agree with metrics.jsonl, and that a resumed run rewrites none of them and ends with
the same files as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cptlab.analysis import per_prompt
from cptlab.api import run_continual
from cptlab.models import weights_sha256
from cptlab.tasks import eval_set_identity, make_split
from helpers import run_until_crash, tiny_config

EVERY_STEP = ["stages=[{domain: arithmetic, steps: 4}]", "run.checkpoint_every=2", "run.keep_checkpoints=2",
              "eval.every=1", "eval.num_prompts=5", "eval.num_samples=3", "eval.domains=[arithmetic,gcd]"]


def evals(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "evals").iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return run_continual(tiny_config(*EVERY_STEP), out_dir=tmp_path_factory.mktemp("full") / "run")


def test_records_match_the_metrics_and_name_the_eval_set(uninterrupted):
    files = evals(uninterrupted)
    assert list(files) == ["stage0-step0.json"] + [f"stage1-step{k}.json" for k in (1, 2, 3, 4)]
    metrics = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    for (stage, step), record in per_prompt.load_all(uninterrupted).items():
        assert record["final"] == (step in (0, 4))
        for domain, entry in record["domains"].items():
            row = next(r for r in metrics if r["event"] == "eval" and r["stage"] == stage and r["step"] == step
                       and r["domain"] == domain)
            bits = per_prompt.greedy(record, domain)
            assert bits.shape == (5,) and row["greedy_acc"] == pytest.approx(bits.mean())
            assert len(entry["sampled_hits"]) == 5 and entry["num_samples"] == 3
            assert row["sampled_acc"] == pytest.approx(sum(entry["sampled_hits"]) / 15)
            assert per_prompt.identity(record, domain) == (5, entry["config_sha256"], entry["prompts_sha256"])
    final = per_prompt.final_record(uninterrupted, 1)
    assert final["step"] == 4 and final["global_step"] == 4


def test_eval_set_identity_changes_with_the_prompts():
    a5, a6 = eval_set_identity("arithmetic", 5), eval_set_identity("arithmetic", 6)
    assert a5["config_sha256"] == a6["config_sha256"] and a5["prompts_sha256"] != a6["prompts_sha256"]
    assert eval_set_identity("arithmetic_ood", 5)["config_sha256"] != a5["config_sha256"]
    assert eval_set_identity("arithmetic", 5, "full")["config_sha256"] != a5["config_sha256"]
    content = json.dumps([[e.question, e.answer] for e in make_split("arithmetic", "eval", 5)], separators=(",", ":"))
    assert a5["prompts_sha256"] == hashlib.sha256(content.encode()).hexdigest()


def test_resumed_run_rewrites_no_record_and_ends_identical(uninterrupted, tmp_path):
    out = tmp_path / "run"
    # stopped while drawing the 4th step's prompts: evals of steps 1-3 are on disk, the checkpoint is step 2's
    run_until_crash(tiny_config(*EVERY_STEP), out, stage=1, step=3)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    assert sorted(before) == ["stage0-step0.json", "stage1-step1.json", "stage1-step2.json", "stage1-step3.json"]
    os.utime(out / "evals" / "stage1-step3.json", ns=(1, 1))  # a rewrite would change this
    run_continual(resume=str(out))
    assert (out / "evals" / "stage1-step3.json").stat().st_mtime_ns == 1  # redone, same bytes: not rewritten
    assert evals(out) == evals(uninterrupted)


def test_base_weights_hash_in_run_start(uninterrupted):
    start = json.loads((uninterrupted / "metrics.jsonl").read_text().splitlines()[0])
    digest = start["base"]["weights_sha256"]
    from cptlab.models import load_model
    from cptlab.config import ModelConfig

    model, _ = load_model(str(uninterrupted / "base"), ModelConfig(), torch.device("cpu"))
    state = {k: v.float() for k, v in model.state_dict().items()}
    assert weights_sha256(state) == digest
    state[next(iter(sorted(state)))].view(-1)[0] += 1e-3  # any change of any weight changes it
    assert weights_sha256(state) != digest


def test_weights_hash_by_hand():
    state = {"b": torch.tensor([1.0]), "a": torch.zeros(2, 1)}
    h = hashlib.sha256()
    h.update(b"a|torch.float32|(2, 1)\n" + np.zeros(2, np.float32).tobytes())
    h.update(b"b|torch.float32|(1,)\n" + np.ones(1, np.float32).tobytes())
    assert weights_sha256(state) == h.hexdigest()


def test_resuming_a_finished_run_changes_no_record(uninterrupted, tmp_path, capsys):
    import shutil

    run = tmp_path / "done"
    shutil.copytree(uninterrupted, run)
    metrics = (run / "metrics.jsonl").read_bytes()
    run_continual(resume=str(run))
    assert "already complete" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_bytes() == metrics and evals(run) == evals(uninterrupted)


def test_every_record_is_named_in_metric_names(uninterrupted):
    from cptlab import metric_names as N

    recs = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in recs} <= set(N.EVENTS)
    assert {N.RUN_START, N.TRAIN, N.EVAL, N.STAGE_END, N.RUN_END} <= {r["event"] for r in recs}
    for r in recs:
        if r["event"] == N.EVAL:
            assert set(N.EVAL_METRICS) <= set(r)
