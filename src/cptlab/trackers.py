"""Experiment trackers (`run.report_to`): TensorBoard, trackio and Weights & Biases watch a run live.

metrics.jsonl stays the source of truth; a tracker is a copy of its scalars, fed by the run store
(store.RunStore.log hands every record it appended to `Trackers.log`), so the driver never knows about
trackers. Only the process that writes metrics.jsonl (rank 0) feeds them. Names, the same in every
tracker, at the record's global step:

    train/<field>            every number of a train record (train/loss, train/reward, ...)
    eval/<domain>/<field>    every number of an eval record (eval/arithmetic/greedy_acc, ...)
    drift/<field>            every number of a drift record (drift/param/rel_l2_base, ...)
    stage                    the stage index at that global step (0: the base model's evaluation)

Curves run across stage boundaries (one eval/<domain>/greedy_acc curve shows a domain rising in its
own stage and falling in the next); the `stage` scalar marks where each stage starts. Null (NaN)
values are left out.

Resume: trackers.json in the run directory holds how many metrics lines the trackers have seen and
the trackio run name / W&B run id; a resumed run continues the same tracker runs and feeds them only
the lines after that count (the steps it redoes after its checkpoint are not sent twice; the lines a
crash kept from the trackers are sent first). A tracker that fails is dropped with one warning line:
the run goes on (its records are in metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .metric_names import DRIFT, EVAL, TRAIN

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""name in run.report_to -> the Python package it needs (installed by the cptlab extra of that name)."""
STATE_FILE = "trackers.json"
KEYS = frozenset({"event", "stage", "stage_name", "step", "global_step", "domain", "method", "final"})
"""Fields of a record that say where it belongs, not what was measured."""


def installed(name: str) -> bool:
    """Whether the package tracker `name` needs can be imported here."""
    return name in TRACKERS and importlib.util.find_spec(TRACKERS[name]) is not None


def check_names(names: list[str], field: str = "run.report_to") -> None:
    """Each name is a known tracker, given once (any config, also a run's own)."""
    for i, name in enumerate(names):
        if name not in TRACKERS:
            raise ConfigError(f"{field}[{i}]", name, "one of " + ", ".join(TRACKERS))
    if len(set(names)) != len(names):
        raise ConfigError(field, names, "each tracker at most once")


def require_packages(names: list[str], field: str = "run.report_to") -> None:
    """Refuse, before any work, a tracker whose package is not installed, naming the extra to install."""
    for name in names:
        if not installed(name):
            raise ConfigError(field, names, f"trackers whose packages are installed ({name} is not: "
                                            f"pip install 'cptlab[{name}]', or pip install {TRACKERS[name]})")


def scalars(record: dict) -> tuple[int, dict[str, float]] | None:
    """(global step, {name: value}) of a train, eval or drift record; None for any other record."""
    event, step = record.get("event"), record.get("global_step")
    if event not in (TRAIN, EVAL, DRIFT) or not isinstance(step, int):
        return None
    prefix = f"{EVAL}/{record.get('domain')}" if event == EVAL else event
    values = {f"{prefix}/{k}": float(v) for k, v in record.items() if k not in KEYS
              and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return step, values


class _TensorBoard:
    """Event files in RUN/tensorboard/ (a resumed run adds a file; readers merge them)."""

    def __init__(self, root: Path, config: dict, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        self.where = f"TensorBoard event files in {root / 'tensorboard'} (tensorboard --logdir {root / 'tensorboard'})"

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    """trackio's local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio), project
    run.tracker_project, run '<run.name>-<6 hex>' (kept in trackers.json, continued on resume)."""

    def __init__(self, root: Path, config: dict, state: dict):
        import trackio

        run = config.get("run", {})
        project = run.get("tracker_project") or "cptlab"
        name = state.setdefault("trackio_run", f"{run.get('name', root.name)}-{secrets.token_hex(3)}")
        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints several lines; we print one
            self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False)
        self.where = f"trackio project '{project}', run '{name}' (trackio show --project {project})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            current = getattr(getattr(trackio, "context_vars", None), "current_run", None)
            if current is not None and current.get() is self.run:
                trackio.finish()  # also forgets the run, which trackio would otherwise finish again at exit
            else:  # another trackio.init came after ours: finish ours alone
                self.run.finish()


class _WandB:
    """A W&B run in RUN/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync RUN/wandb/offline-run-*`
    uploads it later); project run.tracker_project, its id kept in trackers.json and resumed."""

    def __init__(self, root: Path, config: dict, state: dict):
        import wandb

        run = config.get("run", {})
        run_id = state.setdefault("wandb_id", secrets.token_hex(4))
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=run.get("tracker_project") or "cptlab", name=run.get("name", root.name),
                              id=run_id, resume="allow", dir=str(root), config=config, mode=mode,
                              settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True))
        self.where = f"W&B run {run_id} ({mode}) in {root / 'wandb'}"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _WandB}


def _warn(message: str) -> None:
    from .ui import console

    console.print(f"warning: {message}", markup=False, soft_wrap=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class Trackers:
    """The trackers of one run directory, fed with its metrics records in order (see the module doc)."""

    def __init__(self, root: Path, config: dict):
        self.root = Path(root)
        self.names = list((config.get("run") or {}).get("report_to") or [])
        self.state = _read_state(self.root / STATE_FILE) if self.names else {}
        self.state.setdefault("logged_lines", 0)
        self.open: dict[str, Any] = {}
        for name in self.names:
            if name not in OPENERS or not installed(name):
                _warn(f"run.report_to: {name} is not available here; the run goes on without it")
                continue
            try:
                self.open[name] = OPENERS[name](self.root, config, self.state)
            except Exception as e:  # a tracker's own errors (no login, a locked store...) never stop the run
                _warn(f"{name} did not start ({_first_line(e)}); the run goes on without it")
                continue
            from .ui import console

            console.print(f"{name}: {self.open[name].where}", markup=False, soft_wrap=True)

    def log(self, index: int, record: dict, read_lines=None) -> None:
        """Feed the record on metrics line `index` (0-based); lines the trackers saw already are skipped,
        and lines before `index` that they never saw (a crash between the append and this call) are
        fed first, read with `read_lines()`."""
        if not self.open:
            return
        logged = self.state["logged_lines"]
        if index < logged:
            return
        if index > logged and read_lines is not None:
            for missed in read_lines()[logged:index]:
                self._feed(missed)
        self._feed(record)
        self.state["logged_lines"] = index + 1
        self._save()

    def _feed(self, record: dict) -> None:
        found = scalars(record)
        if found is None:
            return
        step, values = found
        if self.state.get("stage_step") != step and isinstance(record.get("stage"), int):
            values["stage"] = float(record["stage"])  # once per global step
            self.state["stage_step"] = step
        if not values:
            return
        for name, tracker in list(self.open.items()):
            try:
                tracker.log(step, values)
            except Exception as e:
                _warn(f"{name} failed ({_first_line(e)}); the run goes on without it")
                self.open.pop(name)

    def _save(self) -> None:
        from .store import atomic_write_json

        atomic_write_json(self.root / STATE_FILE, self.state)

    def close(self) -> None:
        for name, tracker in self.open.items():
            try:
                tracker.close()
            except Exception as e:
                _warn(f"{name} did not close cleanly ({_first_line(e)})")
        self.open = {}
