"""Experiment trackers (run.report_to, trackers.py) and what a run tells the terminal: TensorBoard's
event files and trackio's local store read back equal metrics.jsonl's train, eval and drift scalars at
their global steps, a resumed run sends no line twice, W&B is offline unless WANDB_MODE says otherwise,
unknown names and missing packages are one-line refusals before any work; the end of a run prints the
report's headline and path; without a terminal a progress line comes every CPTLAB_PROGRESS_SECONDS."""

from __future__ import annotations

import atexit
import html
import importlib.machinery
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

# trackio reads its directory once, when imported: every trackio run of this session goes to a temp dir
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="cptlab-test-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

from cptlab import trackers as T  # noqa: E402
from cptlab.api import print_outcome, run_continual  # noqa: E402
from cptlab.config import load_config  # noqa: E402
from cptlab.errors import ConfigError, UserError  # noqa: E402
from cptlab.report import headline_text, write_report  # noqa: E402
from cptlab.store import RunStore, read_jsonl  # noqa: E402
from cptlab.metric_names import TIMING  # noqa: E402
from helpers import assert_one_line_error, make_run, run_until_crash, tiny_config  # noqa: E402

IDS = {"event", "stage", "stage_name", "step", "global_step", "domain", "method", "final"}


def expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """name -> [(global step, value)] as docs/trackers.md names them, written out here independently of
    trackers.scalars: every number of the train, eval and drift records, and the stage once per step."""
    want: dict[str, list[tuple[int, float]]] = defaultdict(list)
    stage_steps = set()
    for r in records:
        if r["event"] not in ("train", "eval", "drift"):
            continue
        g = r["global_step"]
        if g not in stage_steps:
            want["stage"].append((g, float(r["stage"])))
            stage_steps.add(g)
        prefix = {"train": "train", "drift": "drift", "eval": f"eval/{r.get('domain')}"}[r["event"]]
        for k, v in r.items():
            if k not in IDS and v is not None and not isinstance(v, bool):
                want[f"{prefix}/{k}"].append((g, float(v)))
    return dict(want)


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def trackio_scalars(project: str, name: str) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in SQLiteStorage.get_logs(project, name):
        for k, v in row.items():
            if k not in ("step", "timestamp"):
                out[k].append((row["step"], v))
    return {k: sorted(v) for k, v in out.items()}


def as_float32(scalars: dict) -> dict:
    """TensorBoard stores float32: the expected values rounded the same way."""
    import numpy as np

    return {k: [(s, float(np.float32(v))) for s, v in points] for k, points in scalars.items()}


def feed(store: RunStore, records: list[dict]) -> None:
    for r in records:
        store.log(**r)


def hand_written_records(tmp_path: Path) -> list[dict]:
    """A plausible run's records (helpers.make_run: two stages of 4 steps, evals every 2 steps, drift), with
    a null drift value (NaN in the run) that no tracker may receive."""
    records = read_jsonl(make_run(tmp_path / "made", steps=4) / "metrics.jsonl")
    next(r for r in records if r["event"] == "drift")["response/kl_to_base"] = None
    return records


def new_store(root: Path, report_to: list[str], project: str = "cptlab-test") -> RunStore:
    return RunStore.create(root, {"run": {"name": "toy", "report_to": report_to, "tracker_project": project}})


# -- names and packages ---------------------------------------------------------------------------------

def test_unknown_and_repeated_tracker_names_are_refused(cli):
    with pytest.raises(ConfigError, match=r"run.report_to\[1\]' = 'tensorbord': expected one of tensorboard, "
                                          "trackio, wandb"):
        load_config("smoke", ["run.report_to=[trackio,tensorbord]"])
    with pytest.raises(ConfigError, match="each tracker at most once"):
        load_config("smoke", ["run.report_to=[wandb,wandb]"])
    assert load_config("smoke").run.report_to == []  # none by default
    assert_one_line_error(cli("run", "smoke", "run.report_to=[tensorbord]"), "run.report_to[0]", "tensorboard")


def test_a_tracker_without_its_package_is_refused_before_any_work(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(T, "installed", lambda name: name != "wandb")
    cfg = tiny_config("run.report_to=[tensorboard,wandb]")
    with pytest.raises(UserError, match=r"wandb is not: pip install 'cptlab\[wandb\]'"):
        run_continual(cfg, out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    line = assert_one_line_error(cli("run", "smoke", "run.report_to=[wandb]", "--out", tmp_path / "cli"), "cptlab[wandb]")
    assert line.startswith("cptlab: error: config field 'run.report_to'")
    assert not (tmp_path / "cli").exists()
    # a resumed run is checked against its own config.yaml, before anything in it is touched
    store = new_store(tmp_path / "old", ["wandb"])
    store.close()
    before = (tmp_path / "old" / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="cptlab.wandb."):
        run_continual(resume=str(tmp_path / "old"))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [".lock", "config.yaml"]
    assert (tmp_path / "old" / "config.yaml").read_bytes() == before


# -- what the trackers receive ----------------------------------------------------------------------------

def test_tensorboard_and_trackio_receive_every_scalar_at_its_global_step(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    import trackio.utils

    assert str(trackio.utils.TRACKIO_DIR) == os.environ["TRACKIO_DIR"]  # never the user's own store
    records = hand_written_records(tmp_path)
    store = new_store(tmp_path / "run", ["tensorboard", "trackio"])
    feed(store, records)
    store.close()
    written = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert written == records
    want = expected(written)
    # spot checks of the names, by hand: the base eval, stage 1's step-2 eval, its train curve, drift
    assert want["eval/arithmetic/greedy_acc"][:2] == [(0, 0.2), (2, 0.28)]
    assert want["train/reward"][:2] == [(1, 0.24), (2, 0.28)] and len(want["train/reward"]) == 8
    assert want["stage"][:3] == [(0, 0.0), (1, 1.0), (2, 1.0)] and want["stage"][-1] == (8, 2.0)
    assert want["drift/param/rel_l2_base"] == [(4, 0.01), (8, 0.02)]
    assert want["drift/response/kl_to_base"] == [(8, 0.2)]  # the null at step 4 is left out

    assert tensorboard_scalars(tmp_path / "run") == as_float32(want)
    state = json.loads((tmp_path / "run" / T.STATE_FILE).read_text())
    assert state["logged_lines"] == len(written) and state["trackio_run"].startswith("toy-")
    assert trackio_scalars("cptlab-test", state["trackio_run"]) == want


def test_a_resumed_run_sends_no_line_twice_and_none_is_lost(tmp_path):
    """The store is reopened as a resume does it: metrics.jsonl cut back to a checkpoint's line count (26),
    the lines after it written again, then new ones. Either the trackers saw lines after the checkpoint
    (30 sent: 26..29 are not sent again), or lines reached the file that the trackers never got (24 sent,
    as after a crash between an append and its tracker call: 24 and 25 are sent first)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    records = hand_written_records(tmp_path)
    checkpoint = 26
    for sent in (30, 24):
        root = tmp_path / f"run{sent}"
        store = new_store(root, ["tensorboard", "trackio"])
        feed(store, records[:sent])
        store.close()
        with open(root / "metrics.jsonl", "a") as f:  # on disk, never sent
            f.writelines(json.dumps(r) + "\n" for r in records[sent:30])
        name = json.loads((root / T.STATE_FILE).read_text())["trackio_run"]
        resumed = RunStore.open(root)
        resumed.claim()
        resumed.truncate_metrics(checkpoint)
        feed(resumed, records[checkpoint:])
        resumed.close()
        assert read_jsonl(root / "metrics.jsonl") == records
        want = expected(records)
        assert tensorboard_scalars(root) == as_float32(want), sent  # every point once: a duplicate would show
        assert json.loads((root / T.STATE_FILE).read_text())["trackio_run"] == name  # the same trackio run
        assert trackio_scalars("cptlab-test", name) == want, sent


def test_wandb_is_offline_unless_wandb_mode_is_set_and_resumes_its_run(tmp_path, monkeypatch):
    """W&B through a stand-in module (a real offline run writes a binary log that only wandb's Go core
    reads): the arguments wandb.init gets, and what is logged at which step."""
    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.Settings = lambda **kw: kw
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    records = hand_written_records(tmp_path)
    store = new_store(tmp_path / "run", ["wandb"], project="mine")
    feed(store, records[:10])
    store.close()
    init = calls[0][1]
    assert (init["mode"], init["project"], init["name"], init["resume"]) == ("offline", "mine", "toy", "allow")
    assert init["dir"] == str(tmp_path / "run") and init["config"]["run"]["report_to"] == ["wandb"]
    run_id = json.loads((tmp_path / "run" / T.STATE_FILE).read_text())["wandb_id"]
    assert init["id"] == run_id and calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    assert logged[0] == ("log", 0, {"stage": 0.0, **{f"eval/{r['domain']}/{k}": float(r[k]) for r in records[1:2]
                                                     for k in ("greedy_acc", "sampled_acc", "format_rate",
                                                               "mean_length", "num_prompts")}})
    steps = [c[1] for c in logged]
    assert steps == sorted(steps)  # W&B drops a step that goes backwards

    calls.clear()
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice stands
    resumed = RunStore.open(tmp_path / "run")
    resumed.claim()
    feed(resumed, records[10:12])
    resumed.close()
    assert calls[0][1]["mode"] == "online" and calls[0][1]["id"] == run_id


def test_a_failing_tracker_is_dropped_with_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    class Broken:
        def __init__(self, root, config, state):
            self.where = "nowhere"

        def log(self, step, values):
            raise RuntimeError("disk quota exceeded\nmore detail")

        def close(self):
            pass

    monkeypatch.setitem(T.OPENERS, "tensorboard", Broken)
    monkeypatch.setattr(T, "installed", lambda name: True)
    store = new_store(tmp_path / "run", ["tensorboard"])
    records = hand_written_records(tmp_path)
    feed(store, records)
    store.close()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == records
    out = capsys.readouterr().out
    assert out.count("warning: tensorboard failed (disk quota exceeded); the run goes on without it") == 1


@pytest.mark.slow
def test_a_real_run_feeds_tensorboard_and_trackio_and_resumes_without_duplicates(tmp_path):
    """run_continual in-process (the seconds-long tiny config, evals every step), killed in stage 2 and
    resumed: TensorBoard's and trackio's scalars equal the finished metrics.jsonl's."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    # checkpoints at stage ends only: the lines of stage 2's first steps are logged, cut and written again
    cfg = tiny_config("run.report_to=[tensorboard,trackio]", "run.tracker_project=cptlab-e2e", "eval.every=1",
                      "eval.drift=true", "run.checkpoint_every=0")
    run_until_crash(cfg, tmp_path / "run", stage=2, step=2)
    cut = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    run_continual(resume=str(tmp_path / "run"))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    redone = [r for r in cut if r["event"] == "train" and r["stage"] == 2]
    assert [r["global_step"] for r in redone] == [4, 5]  # logged, then cut back to stage 1's end and redone

    def timeless(scalars: dict) -> dict:
        """The trackers keep the first values of a redone step: equal but for the wall-clock fields."""
        return {k: v for k, v in scalars.items() if k.rpartition("/")[2] not in TIMING and "/seconds/" not in k}

    want = expected(records)
    assert {"train/loss", "drift/param/rel_l2_base", "stage", "eval/arithmetic/greedy_acc"} <= set(want)
    assert timeless(tensorboard_scalars(tmp_path / "run")) == timeless(as_float32(want))
    name = json.loads((tmp_path / "run" / T.STATE_FILE).read_text())["trackio_run"]
    assert timeless(trackio_scalars("cptlab-e2e", name)) == timeless(want)
    assert trackio_scalars("cptlab-e2e", name)["train/step_seconds"][3][1] == redone[0]["step_seconds"]


# -- the terminal -------------------------------------------------------------------------------------------

def report_headline(report: Path) -> list[str]:
    """The <li> sentences of report.html's headline card, as plain text."""
    card = re.search(r'<div class="card headline" id="headline"><ul>(.*?)</ul>', report.read_text(), re.S)[1]
    return [html.unescape(re.sub(r"<[^>]*>", "", li)) for li in re.findall(r"<li>(.*?)</li>", card, re.S)]


def test_the_end_of_a_run_prints_the_reports_headline_and_path(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    report = write_report(run)
    sentences = report_headline(report)
    assert sentences[0].startswith("Base model: mean greedy accuracy") and len(sentences) >= 4
    assert headline_text(run) == sentences
    capsys.readouterr()
    print_outcome(run)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"- {s}" for s in sentences] + [f"report: {report.resolve()}"]  # one line each, unwrapped
    report.unlink()
    print_outcome(run)
    assert capsys.readouterr().out.splitlines()[-1] == f"report: none (run.report is false; `cptlab report {run}` writes it)"


PROGRESS_LINE = re.compile(r"^work: (\d+)/5 \((\d+)%\), 0:00:0\d elapsed(, item \d)?$")


def test_without_a_terminal_a_progress_line_comes_every_interval(monkeypatch, capsys):
    import time

    from cptlab import ui

    assert not ui.console.is_terminal  # pytest's captured stdout
    monkeypatch.setenv("CPTLAB_PROGRESS_SECONDS", "0.1")
    with ui.progress("work", 5) as advance:
        for i in range(5):
            time.sleep(0.12)
            advance(info=f"item {i}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 4 and all(PROGRESS_LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("work: 5/5 (100%)")  # the last line: the work is done
    done = [int(PROGRESS_LINE.match(line)[1]) for line in lines]
    assert done == sorted(done)
    monkeypatch.setenv("CPTLAB_PROGRESS_SECONDS", "0")  # off
    with ui.progress("work", 5) as advance:
        time.sleep(0.15)
        advance(5)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("CPTLAB_PROGRESS_SECONDS", "soon")  # unreadable: the default
    assert ui.progress_seconds() == ui.PROGRESS_SECONDS == 30.0


def test_on_a_terminal_the_bar_stays_and_no_progress_lines_are_printed(monkeypatch):
    import time

    from rich.console import Console

    from cptlab import ui

    terminal = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=terminal, force_terminal=True, width=100))
    monkeypatch.setenv("CPTLAB_PROGRESS_SECONDS", "0.05")
    with ui.progress("work", 3) as advance:
        for _ in range(3):
            time.sleep(0.1)
            advance(info="x")
    shown = terminal.getvalue()
    assert "work" in shown and "elapsed" not in shown  # rich's live bar, not the lines


@pytest.mark.slow
def test_a_run_without_a_terminal_shows_progress_from_the_warm_up_on_and_ends_with_the_report(tmp_path):
    """`python -m cptlab.cli run smoke` with stdout a pipe (as under nohup or CI): progress lines during
    the warm-up and the stages, then the headline and the report's path."""
    # an interval far below the warm-up's length on any machine (a 2 s one printed nothing where the
    # 40-step warm-up took under 2 s)
    env = {**os.environ, "CPTLAB_PROGRESS_SECONDS": "0.05", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "cptlab.cli", "run", "smoke", "--out", str(tmp_path / "run"),
                           "run.device=cpu", f"warmup.cache_dir={tmp_path / 'cache'}", "run.report_to=[tensorboard]"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(re.match(r"warm-up SFT: \d+/\d+ \(\d+%\), \d:\d\d:\d\d elapsed", line) for line in lines), lines
    report = tmp_path / "run" / "report.html"
    assert lines[-1] == f"run written to {tmp_path / 'run'}"
    assert lines[-2] == f"report: {report.resolve()}"
    sentences = report_headline(report)
    assert lines[-2 - len(sentences):-2] == [f"- {s}" for s in sentences]
    want = expected(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert tensorboard_scalars(tmp_path / "run") == as_float32(want)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["run"]["report_to"] == ["tensorboard"]
