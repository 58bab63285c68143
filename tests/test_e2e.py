"""End-to-end through the real command: the smoke preset runs, writes its files, and resumes after a
SIGKILL in the middle of a stage to the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import records

pytestmark = pytest.mark.slow


# one torch thread, as in-process tests run: two make the tiny model many times slower on a busy 2-core box
ENV = {**os.environ, "CPTLAB_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cptlab.cli", *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli("run", "smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smoke_writes_run_directory(smoke_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "base/model.safetensors"):
        assert (smoke_run / name).exists(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["complete"] and len(summary["accuracy_matrix"]) == 3  # base + 2 stages
    events = [r["event"] for r in records(smoke_run)]
    assert events[0] == "run_start" and events[-1] == "run_end"
    assert events.count("train") == 6 and "stage_end" in events
    assert list((smoke_run / "samples").glob("*.json"))
    drift = {r["stage"]: r for r in records(smoke_run) if r["event"] == "drift"}
    assert sorted(drift) == [0, 1, 2] and drift[0]["param/rel_l2_base"] == 0.0
    # the SDPO stage always has a gradient (the smoke model's GRPO stage may see all-zero rewards and
    # rightly not move): it moved from the base and from the previous stage's weights
    assert drift[2]["param/rel_l2_base"] > 0 and drift[2]["param/rel_l2_prev"] > 0
    # the weight geometry rides in the same record: none at the base, some after the SDPO stage
    assert drift[0]["param/max_angle"] < 1e-6 and drift[0]["param/principal_mask_overlap"] == 1.0
    assert drift[2]["param/spectral_shift"] > 0 and 0 < drift[2]["param/principal_update_share/mlp"] < 1


# a first stage long enough that the kill lands in its middle: 6 steps (and 3 evaluations) follow the
# step-2 checkpoint, more than a second even at one thread on an idle machine
LONG_STAGE_1 = ["stages=[{domain: arithmetic, steps: 8}, {domain: sorting, steps: 2, method: {name: sdpo}}]",
                "run.report=false"]


@pytest.fixture(scope="module")
def long_stage_1_run(tmp_path_factory):
    """The uninterrupted run that the killed one is compared with; its base goes into a warm-up cache
    that the killed run reads."""
    cache = tmp_path_factory.mktemp("warmup-cache")
    out = tmp_path_factory.mktemp("long") / "run"
    proc = run_cli("run", "smoke", *LONG_STAGE_1, f"warmup.cache_dir={cache}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache


def test_resume_after_sigkill_mid_stage_matches_uninterrupted_run(long_stage_1_run, tmp_path):
    """The real command killed (SIGKILL) as soon as its mid-stage checkpoint stage1-step2 exists, then
    `cptlab run --resume`: every record (timing and the base's source aside) equals the uninterrupted
    run's, with one run_start and one run_end."""
    uninterrupted, cache = long_stage_1_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cptlab.cli", "run", "smoke", *LONG_STAGE_1,
                             f"warmup.cache_dir={cache}", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    mid_stage = out / "checkpoints" / "stage1-step2"  # renamed into place whole: it exists complete or not at all
    deadline = time.time() + 300
    try:
        while not mid_stage.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed: it exited with {proc.returncode}"
    assert '"run_end"' not in (out / "metrics.jsonl").read_text()
    kept = [d for d in (out / "checkpoints").iterdir() if not d.name.startswith(".")]  # not a temp dir cut short
    newest = max(kept, key=lambda d: json.loads((d / "state.json").read_text())["order"])
    state = json.loads((newest / "state.json").read_text())
    assert newest.name == "stage1-step2" and state["stage_done"] is False, (newest.name, state)

    resumed = run_cli("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from stage1-step2" in resumed.stdout, resumed.stdout[-3000:]
    # the base's record says where it came from (built there, read from the cache here): all else is equal
    got, want = records(out, drop=("base",)), records(uninterrupted, drop=("base",))
    assert got == want
    events = [r["event"] for r in got]
    assert events.count("run_start") == 1 and events.count("run_end") == 1 and events.count("train") == 10
    assert json.loads((out / "summary.json").read_text())["accuracy_matrix"] == \
        json.loads((uninterrupted / "summary.json").read_text())["accuracy_matrix"]
