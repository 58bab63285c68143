"""Reliability (issue 6): torn metrics lines, checkpoint atomicity and integrity, numerical faults,
a full disk, terminal escaping, and a soak run that must not grow in memory.

The runs here are the smoke preset shrunk to seconds (no warm-up, one eval domain, 2 prompts x 2
samples, 8 new tokens) and run in-process with one torch thread: two threads on a two-core machine
that is busy with anything else make tiny matmuls hundreds of times slower.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cptlab.checkpoint
import cptlab.methods
import cptlab.store
from cptlab.checkpoint import load_state
from cptlab.config import load_config
from cptlab.api import run_continual
from cptlab.continual import Driver
from cptlab.resume import open_run
from cptlab.errors import NumericalFault, UserError
from cptlab.store import RunStore
from helpers import TINY, Crash, one_error_line, records, run_until_crash, tiny_config, tree_bytes

FOUR_STEPS = ["stages=[{domain: arithmetic, steps: 4}]", "run.checkpoint_every=2", "run.keep_checkpoints=2"]
SFT_THREE_STEPS = ["stages=[{domain: arithmetic, steps: 3, method: {name: sft}}]", "run.checkpoint_every=1",
                   "run.keep_checkpoints=10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return run_continual(tiny_config(*FOUR_STEPS), out_dir=tmp_path_factory.mktemp("full") / "run")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """The same run, stopped dead at the 4th step of stage 1: after the step-2 checkpoint and after the
    step-3 train record, which that checkpoint has not seen."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    run_until_crash(tiny_config(*FOUR_STEPS), out, stage=1, step=3)
    return out


@pytest.fixture()
def crashed_copy(crashed, tmp_path) -> Path:
    return Path(shutil.copytree(crashed, tmp_path / "run"))


# -- 1. metrics.jsonl: a torn last line ------------------------------------------------------------

def test_crashed_run_state_is_what_the_resume_tests_assume(crashed):
    store = RunStore.open(crashed)
    latest = store.checkpoint_dirs()[-1]
    assert latest.name == "stage1-step2"
    steps = [r["step"] for r in records(crashed) if r["event"] == "train"]
    assert steps == [1, 2, 3]  # step 3 was logged after the checkpoint: the resume must drop it
    assert load_state(latest)["metrics_lines"] == len(records(crashed)) - 1


def test_resume_drops_torn_line_and_matches_uninterrupted_run(crashed_copy, uninterrupted):
    metrics = crashed_copy / "metrics.jsonl"
    with open(metrics, "ab") as f:  # the crash cut a record in half
        f.write(b'{"event": "train", "stage": 1, "domain": "arith')
    assert RunStore.open(crashed_copy).read_metrics() == [json.loads(x) for x in metrics.read_text().splitlines()[:-1]]
    run_continual(resume=str(crashed_copy))
    text = metrics.read_text()
    assert "arith\n" not in text and '"arith{' not in text
    assert records(crashed_copy) == records(uninterrupted)  # nothing lost, nothing twice
    train = [(r["stage"], r["step"]) for r in records(crashed_copy) if r["event"] == "train"]
    assert train == [(1, 1), (1, 2), (1, 3), (1, 4)]


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    store = RunStore.create(tmp_path / "r", {"run": {"name": "x"}})
    store.log("a", i=1)
    store.log("b", i=2)
    store.close()
    with open(store.metrics_path, "ab") as f:
        f.write(b'{"event": "c", "i"')
    again = RunStore.open(tmp_path / "r")
    again.log("d", i=4)
    again.close()
    assert [r["event"] for r in again.read_metrics()] == ["a", "b", "d"]
    assert again.metrics_lines == 3
    # only the newline was lost: the record is complete and kept, and the next one starts a new line
    with open(store.metrics_path, "ab") as f:
        f.write(b'{"event": "e", "i": 5}')
    third = RunStore.open(tmp_path / "r")
    third.log("f", i=6)
    third.close()
    assert [r["event"] for r in third.read_metrics()] == ["a", "b", "d", "e", "f"]


def test_full_disk_mid_line_leaves_no_torn_line(tmp_path, monkeypatch):
    store = RunStore.create(tmp_path / "r", {"run": {"name": "x"}})
    store.log("a", i=1)
    before = store.metrics_path.read_bytes()
    real_write, calls = os.write, []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cptlab.store.os, "write", half_then_full)
    with pytest.raises(OSError) as info:
        store.log("b", text="x" * 100)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(store.metrics_path)
    assert len(calls) == 2  # half the line reached the file before the disk filled up ...
    assert store.metrics_path.read_bytes() == before  # ... and was taken back
    store.log("c", i=3)
    store.close()
    assert [r["event"] for r in store.read_metrics()] == ["a", "c"]


def test_resume_refuses_when_metrics_lost_lines_the_checkpoint_saw(crashed_copy):
    metrics = crashed_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]))
    with pytest.raises(UserError, match="metrics.jsonl: 2 complete lines"):
        run_continual(resume=str(crashed_copy))
    assert metrics.read_text() == "".join(lines[:2])


# -- 2. checkpoint atomicity and integrity ---------------------------------------------------------

def test_half_written_temp_checkpoint_is_ignored(crashed_copy, uninterrupted):
    # a newer checkpoint that a crash left in its temp dir: files copied, one truncated, never renamed
    ckpts = crashed_copy / "checkpoints"
    tmp = Path(shutil.copytree(ckpts / "stage1-step2", ckpts / ".stage1-step4.x8k2q"))
    state = json.loads((tmp / "state.json").read_text())
    (tmp / "state.json").write_text(json.dumps({**state, "step": 4, "order": 10**6}))
    (tmp / "model.safetensors").write_bytes((tmp / "model.safetensors").read_bytes()[:1000])
    assert [d.name for d in RunStore.open(crashed_copy).checkpoint_dirs()] == ["stage0-step0", "stage1-step2"]
    run_continual(resume=str(crashed_copy))
    assert records(crashed_copy) == records(uninterrupted)


def test_checkpoint_files_are_recorded_and_nothing_temporary_is_left(uninterrupted):
    ckpts = uninterrupted / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == ["stage1-step2", "stage1-step4"]  # keep_checkpoints=2
    state = load_state(ckpts / "stage1-step2")
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "rng.json", "rng.safetensors"}
    size = (ckpts / "stage1-step2" / "model.safetensors").stat().st_size
    assert state["files"]["model.safetensors"]["bytes"] == size


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # in the tensor data: safetensors alone would load this without complaint
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name, needle", [
    (_truncate, "model.safetensors", "truncated or corrupted"),
    (_flip_byte, "model.safetensors", "sha256"),
    (_flip_byte, "optimizer.pt", "sha256"),
    (Path.unlink, "rng.json", "missing"),
    (lambda p: p.write_text('{"stage": 1, "st'), "state.json", "state.json is corrupted"),
])
def test_resume_from_damaged_checkpoint_is_refused_and_changes_nothing(crashed_copy, cli, damage, name, needle):
    ckpt = crashed_copy / "checkpoints" / "stage1-step2"
    damage(ckpt / name)
    before = tree_bytes(crashed_copy)
    result = cli("run", "--resume", crashed_copy)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert str(ckpt) in line and name in line and needle in line, line
    after = tree_bytes(crashed_copy)
    assert {k: v for k, v in after.items() if k in before} == before  # not a byte lost or changed


@pytest.mark.slow
def test_resume_refusal_is_one_line_from_the_real_command(crashed_copy):
    _truncate(crashed_copy / "checkpoints" / "stage1-step2" / "model.safetensors")
    metrics = (crashed_copy / "metrics.jsonl").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "cptlab.cli", "run", "--resume", str(crashed_copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "model.safetensors" in proc.stderr
    assert (crashed_copy / "metrics.jsonl").read_bytes() == metrics


def test_failed_checkpoint_save_leaves_no_temp_dir_and_keeps_the_previous(tmp_path, tiny_model):
    store = RunStore.create(tmp_path / "r", {"run": {"name": "x"}})
    cptlab.checkpoint.save_checkpoint(store, "stage0-step0", {"order": 0}, tiny_model)

    class Boom:  # an optimizer whose state cannot be saved, after model.safetensors was written
        def state_dict(self):
            raise Crash

    with pytest.raises(Crash):
        cptlab.checkpoint.save_checkpoint(store, "stage1-step1", {"order": 1}, tiny_model, optimizer=Boom())
    assert [p.name for p in store.checkpoints.iterdir()] == ["stage0-step0"]
    load_state(store.checkpoints / "stage0-step0")  # verified intact


# -- 3. numerical faults ----------------------------------------------------------------------------

def nan_on_call(monkeypatch, target: str, bad_calls: set[int], mode: str = "loss"):
    """Patch cptlab.methods.<target> so that the given (1-based) calls give a NaN loss, or (mode
    'grad') a finite loss whose gradient is NaN."""
    original, calls = getattr(cptlab.methods, target), []

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def patched(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls.append(1)
        if len(calls) in bad_calls:
            loss = loss * float("nan") if mode == "loss" else NanGrad.apply(loss)
        return loss, stats

    monkeypatch.setattr(cptlab.methods, target, patched)
    return calls


def test_nan_loss_stops_the_stage_and_the_report_still_builds(tmp_path, monkeypatch, cli):
    nan_on_call(monkeypatch, "sft_loss", {2})
    out = tmp_path / "run"
    result = cli("run", "smoke", *TINY, *SFT_THREE_STEPS, "--out", out)
    assert result.exit_code == 3, result.output
    line = one_error_line(result)
    assert "numerical fault" in line and "stage 1 (arithmetic, sft) step 2 of 3" in line and "loss is nan" in line
    recs = records(out)
    assert [r["step"] for r in recs if r["event"] == "train"] == [1]  # the metrics so far are on disk
    fault = [r for r in recs if r["event"] == "fault"]
    assert len(fault) == 1 and fault[0]["action"] == "stopped" and "step 2 of 3" in fault[0]["reason"]
    # the last good checkpoint is kept, complete, and its weights are finite
    store = RunStore.open(out)
    latest = store.checkpoint_dirs()[-1]
    assert latest.name == "stage1-step1" and load_state(latest)["metrics_lines"] <= len(recs)
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "model.safetensors")).values())
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"]
    assert not (out / "report.html").exists()  # run.report=false: `cptlab report` builds it
    result = cli("report", out)
    assert result.exit_code == 0, result.output
    assert "<html" in (out / "report.html").read_text().lower()


def test_nan_gradient_with_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    nan_on_call(monkeypatch, "sft_loss", {1}, mode="grad")
    cfg, store = open_run(tiny_config(*SFT_THREE_STEPS), out_dir=str(tmp_path / "run"))
    driver = Driver(cfg, store)
    with pytest.raises(NumericalFault, match=r"stage 1 \(arithmetic, sft\) step 1 of 3: gradient norm is nan"):
        driver.run()
    store.close()
    base = dict(driver.base.named_parameters())
    for name, p in driver.model.named_parameters():  # the NaN gradient never reached the weights
        assert torch.equal(p, base[name]), name
    assert [d.name for d in store.checkpoint_dirs()] == ["stage0-step0"]


def test_nan_policy_skip_skips_and_counts_the_bad_batch(tmp_path, monkeypatch):
    calls = nan_on_call(monkeypatch, "sft_loss", {2})
    out = run_continual(tiny_config(*SFT_THREE_STEPS, "method.nan_policy=skip"), out_dir=tmp_path / "run")
    assert len(calls) == 3
    recs = records(out)
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["skipped_batches"] for r in train] == [0, 1, 1]
    assert "loss" not in train[1] and "loss" in train[2]
    faults = [r for r in recs if r["event"] == "fault"]
    assert len(faults) == 1 and faults[0]["action"] == "skipped" and faults[0]["step"] == 2
    assert "loss is nan" in faults[0]["reason"]
    assert json.loads((out / "summary.json").read_text())["complete"]
    # the skipped batch changed no weight; the batches around it did
    w = {s: load_file(str(out / "checkpoints" / f"stage1-step{s}" / "model.safetensors")) for s in (1, 2, 3)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2])


# -- 4. a full disk ---------------------------------------------------------------------------------

def test_full_disk_during_checkpoint_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, cli,
                                                                             uninterrupted):
    real, full = cptlab.store.write_synced, []

    def write_synced(path, data):  # the disk fills up while the stage-1 step-2 checkpoint is written
        if full or ".stage1-step2." in str(path):
            full.append(str(path))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(cptlab.store, "write_synced", write_synced)
    monkeypatch.setattr(cptlab.checkpoint, "write_synced", write_synced)
    out = tmp_path / "run"
    result = cli("run", "smoke", *TINY, *FOUR_STEPS, "--out", out)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "disk full while writing" in line and str(out) in line and ".tmp" not in line, line
    assert full[0].endswith("model.safetensors")
    # everything written before the disk filled up is intact: metrics (every line whole, in order),
    # config, the previous checkpoint (verified against its recorded sizes and digests); no temp dir
    recs = records(out)
    assert recs == records(uninterrupted)[: len(recs)]
    assert [r["step"] for r in recs if r["event"] == "train"] == [1, 2]
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["stage0-step0"]
    load_state(out / "checkpoints" / "stage0-step0")
    assert load_config(str(out / "config.yaml")).stages[0].steps == 4
    # space freed: the run resumes and ends exactly as the uninterrupted one
    monkeypatch.setattr(cptlab.store, "write_synced", real)
    monkeypatch.setattr(cptlab.checkpoint, "write_synced", real)
    result = cli("run", "--resume", out)
    assert result.exit_code == 0, result.output
    assert records(out) == records(uninterrupted)


def _is_char_device(path: str) -> bool:
    return os.path.exists(path) and stat.S_ISCHR(os.stat(path).st_mode)


@pytest.mark.skipif(not _is_char_device("/dev/full"), reason="needs the /dev/full device")
def test_a_real_full_disk_is_an_oserror_naming_the_file():
    # /dev/full fails every write with ENOSPC; safetensors' save_file and torch.save to a path return
    # without an error there (checked on Linux), which is why checkpoint files go through write_synced
    with pytest.raises(OSError) as info:
        cptlab.store.write_synced(Path("/dev/full"), b"x" * 10_000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"


# -- 5. model text on the terminal ------------------------------------------------------------------

EVIL = "x \x1b[31mred\x1b[0m [bold]loud[/bold] :thumbs_up: \x1b]0;title\x07 back\rover"


def test_model_text_renders_as_text_on_the_terminal():
    from rich.table import Table

    from cptlab.ui import console, safe_text

    table = Table()
    table.add_column("completion")
    table.add_row(safe_text(EVIL))
    with console.capture() as capture:
        console.print(safe_text(EVIL))
        console.print(f"[dim]{safe_text(EVIL + chr(92))}[/dim]")  # a trailing backslash must not eat the tag
        console.print(table)
    out = capture.get()
    assert not any(ch in out for ch in "\x1b\x07\r")  # nothing reaches the terminal as a control code
    assert out.count("[bold]loud[/bold]") == 3 and out.count(":thumbs_up:") == 3
    assert out.count("\\x1b[31mred\\x1b[0m") == 3 and "\\r" in out


def test_domains_command_escapes_task_text(cli, monkeypatch):
    import cptlab.tasks

    row = {c: EVIL for c in ("name", "family", "ood_of", "task", "source", "example", "solution")}
    monkeypatch.setattr(cptlab.tasks, "domain_table", lambda *args: [row])
    result = cli("domains")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "[bold]" in result.stdout and ":thumbs_up:" in result.stdout


# -- 6. soak: memory does not grow across stages ----------------------------------------------------

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_soak_three_stage_study_twice_memory_does_not_grow(tmp_path, monkeypatch):
    """The smoke model (with its warm-up) through grpo, sdpo and sft stages, twice; after every stage
    the resident memory and the live tensors are measured."""
    rss, tensors, original = [], [], Driver.run_stage

    def run_stage(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        gc.collect()
        rss.append(rss_mib())
        tensors.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)))
        return result

    monkeypatch.setattr(Driver, "run_stage", run_stage)
    stages = ("stages=[{domain: arithmetic, steps: 2, method: {name: grpo}}, "
              "{domain: sorting, steps: 2, method: {name: sdpo}}, {domain: arithmetic, steps: 2, method: {name: sft}}]")
    for i in range(2):
        out = run_continual(load_config("smoke", [stages, "run.report=true", "run.device=cpu"]),
                            out_dir=tmp_path / f"run{i}")
        assert json.loads((out / "summary.json").read_text())["complete"]
        assert (out / "report.html").exists()
    assert len(rss) == 6
    growth = (rss[-1] - rss[1]) / rss[1]
    print(f"RSS after each stage (MiB): {[round(x, 1) for x in rss]}; live tensors: {tensors}")
    assert growth < 0.15, f"RSS after each stage (MiB): {[round(x) for x in rss]}"
    # the second run holds no more tensors than the first at the same point: nothing accumulates
    assert tensors[3:] == tensors[:3], tensors
