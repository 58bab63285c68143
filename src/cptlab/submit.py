"""The submitit launcher of studies (`cptlab study NAME --launcher submitit`): every cell one job through
the `submitit` library, on Slurm or (cluster 'local') as processes of submitit's local executor.

A cell's job runs `study.run_cell` in the job's own Python process, exactly what `--jobs 1` runs in
process: a new cell starts, a cell with a config.yaml resumes from its last checkpoint; a finished cell
is never submitted (study.py skips it). Each submitted job is recorded in <study>/<cell>.job.json, so
that a study run again while that job is still queued or running waits for it instead of submitting
the cell a second time (two jobs writing one run directory). Ctrl-C cancels the jobs this run waits
for, as `--jobs N` ends its processes; running the study again resumes them.

The base model is built once, before the cells, when they would each build it (the tiny model's
warm-up, or a GGUF file's dequantization): by a job of its own on the cluster, so that every cell
starts from the same weights (GPU warm-ups are not bitwise reproducible).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError, UserError

ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
POLL_SECONDS = 2.0


@dataclass
class SlurmConfig:
    """How `cptlab study --launcher submitit` submits cells (a study file's `slurm:` section; the CLI's
    --cluster, --partition, --gpus-per-cell, --time-min and --log-folder override it)."""

    cluster: Literal["auto", "slurm", "local"] = "auto"
    """'slurm': sbatch jobs; 'local': submitit's local executor (processes on this machine, no
    cluster; what the tests use); 'auto': Slurm where its commands exist, else local."""
    partition: str | None = None
    """Slurm partition (None: the cluster's default)."""
    gpus_per_cell: int = 1
    """GPUs each cell's job asks for (0 for a CPU study; one cell is one process, so more than 1 only
    helps a cell that itself runs several processes: see docs/cluster.md)."""
    cpus_per_cell: int = 8
    """CPU cores each cell's job asks for; the cell's torch uses that many threads."""
    mem_gb: float | None = None
    """Host memory per job in GB (None: the partition's default)."""
    time_min: int = 720
    """Wall-clock limit per job in minutes; a cell stopped by it resumes from its last checkpoint
    when the study runs again."""
    log_folder: str = ""
    """Where submitit writes each job's pickles and logs ('%j' is the job id); '' is
    <out>/<study>/submitit."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of each Slurm job (e.g. 'module load cuda', 'source venv/bin/activate')."""
    additional: dict[str, str] = field(default_factory=dict)
    """Further sbatch options by name without dashes (e.g. {account: proj42, qos: high, constraint: h100})."""


def check_slurm_config(cfg: SlurmConfig) -> None:
    """ConfigError naming the first out-of-range field."""
    for name, low in (("gpus_per_cell", 0), ("cpus_per_cell", 1), ("time_min", 1)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            flag = f" (--{name.replace('_', '-')})" if name != "cpus_per_cell" else ""
            raise ConfigError(f"study.slurm.{name}{flag}", value, f"an integer >= {low}")
    if cfg.mem_gb is not None and not cfg.mem_gb > 0:
        raise ConfigError("study.slurm.mem_gb", cfg.mem_gb, "a number of GB > 0, or null")


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs the submitit library: pip install cptlab[cluster] "
                        "(from a checkout: pip install -e .[cluster])") from None
    return submitit


def make_executor(cfg: SlurmConfig, folder: Path):
    """A submitit executor for `cfg`'s cluster, its parameters set; (executor, cluster name)."""
    submitit = require_submitit()
    cluster = None if cfg.cluster == "auto" else cfg.cluster
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError:  # submitit's Slurm executor looks for srun
        raise ConfigError("study.slurm.cluster (--cluster)", cfg.cluster, "'local' or 'auto' on a machine without "
                          "Slurm (no srun on PATH); submit from a node of the Slurm cluster") from None
    params = dict(timeout_min=cfg.time_min, gpus_per_node=cfg.gpus_per_cell, cpus_per_task=cfg.cpus_per_cell,
                  tasks_per_node=1, nodes=1, name="cptlab")
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if executor.cluster == "slurm":
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.setup:
            params["slurm_setup"] = list(cfg.setup)
        if cfg.additional:
            params["slurm_additional_parameters"] = dict(cfg.additional)
    elif executor.cluster == "local":
        params.pop("cpus_per_task")  # the local executor does not take it (it runs on this machine's cores)
        params.pop("nodes")
    executor.update_parameters(**params)
    return executor, executor.cluster


def _threads_for_job() -> None:
    """A cell job's torch threads: CPTLAB_NUM_THREADS, else the cores Slurm gave the job."""
    import torch

    threads = os.environ.get("CPTLAB_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def cell_job(preset: str, overrides: list[str], cell: str) -> str:
    """What one cell's job runs (in the job's process): the cell, started or resumed."""
    from .study import run_cell

    _threads_for_job()
    run_cell(preset, overrides, Path(cell))
    return cell


def base_job(preset: str, overrides: list[str]) -> str:
    """Build (warm up, or dequantize) the base model into its cache, once for every cell."""
    from .config import load_config
    from .continual import base_model
    from .models import resolve_device

    _threads_for_job()
    cfg = load_config(preset, overrides)
    base_model(cfg, resolve_device(cfg.run.device))
    return "base"


def needs_base_job(cfg) -> bool:
    """Whether the cells would each build the base model: the tiny model's warm-up not yet in its cache,
    or a GGUF file (whose dequantized copy is cached); a Hugging Face directory is loaded as it is."""
    from .gguf_model import find_gguf
    from .warmup import cache_path

    if cfg.model.path:
        return find_gguf(cfg.model.path) is not None
    cached = cache_path(cfg)
    return cached is not None and not (cached / "config.json").exists() and cfg.warmup.enabled and cfg.warmup.steps > 0


def _record_path(root: Path, cell: Path) -> Path:
    return root / f"{cell.name}.job.json"


def _write_record(root: Path, cell: Path, job, cluster: str) -> None:
    from .store import atomic_write_json

    record = dict(job_id=str(job.job_id), cluster=cluster, folder=str(job.paths.folder),
                  stdout=str(job.paths.stdout), stderr=str(job.paths.stderr), submitted=time.time())
    atomic_write_json(_record_path(root, cell), record)


class _Recorded:
    """A job submitted by an earlier run of the study (its <cell>.job.json): still active or not."""

    def __init__(self, record: dict):
        self.record = record
        self.job_id = record["job_id"]

    def _slurm_job(self):
        return require_submitit().SlurmJob(folder=self.record["folder"], job_id=self.job_id)

    def active(self) -> bool:
        if self.record.get("cluster") == "slurm":
            return self._slurm_job().state.split(" ")[0] in ACTIVE_SLURM_STATES
        if self.record.get("cluster") == "local":  # the local executor's job id is its controller's pid
            try:
                os.kill(int(self.job_id), 0)
            except (OSError, ValueError):
                return False
            cmdline = Path(f"/proc/{self.job_id}/cmdline")  # Linux: not a pid reused by another program
            return not cmdline.exists() or b"submitit" in cmdline.read_bytes()
        return False

    def done(self) -> bool:
        return not self.active()

    def cancel(self, check: bool = False) -> None:
        if self.record.get("cluster") == "slurm":
            self._slurm_job().cancel(check=check)


def _still_running(root: Path, cell: Path) -> _Recorded | None:
    path = _record_path(root, cell)
    if not path.exists():
        return None
    try:
        job = _Recorded(json.loads(path.read_text()))
        return job if job.active() else None
    except (ValueError, KeyError, OSError):
        return None


def run_cells(preset: str, study_name: str, root: Path, pending: list[tuple[Path, list[str]]], cfg: SlurmConfig,
              max_running: int | None, say) -> None:
    """Submit every pending cell (at most `max_running` queued or running at once; None: all), wait for
    them, and raise a UserError naming the cells that did not finish (their logs named)."""
    from .config import load_config
    from .study import cell_done

    check_slurm_config(cfg)
    require_submitit()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(cfg.log_folder or root / "submitit") / "%j"
    executor, cluster = make_executor(cfg, folder)
    say(f"[study {study_name}] submitit: {cluster} executor, {len(pending)} cell(s), logs in {folder.parent}")
    queue, active, failed = list(pending), {}, []
    for cell, _ in pending:
        earlier = _still_running(root, cell)
        if earlier is not None:  # submitted by a run of the study that was stopped: wait, do not resubmit
            say(f"[study {study_name}] {cell.name}: job {earlier.job_id} still queued or running, waiting for it")
            active[cell] = earlier
            queue = [item for item in queue if item[0] != cell]
    try:
        first = load_config(preset, queue[0][1]) if queue else None
        if first is not None and needs_base_job(first):
            job = executor.submit(base_job, preset, queue[0][1])
            say(f"[study {study_name}] building the base model once: job {job.job_id} (log: {job.paths.stdout})")
            active[root / "base"] = job
            job.wait()
            del active[root / "base"]
            if job.exception() is not None:
                raise UserError(f"the base model's job {job.job_id} failed (log: {job.paths.stderr}); "
                                "run the study again to retry")
        while queue or active:
            while queue and (max_running is None or len(active) < max_running):
                cell, overrides = queue.pop(0)
                job = executor.submit(cell_job, preset, overrides, str(cell))
                _write_record(root, cell, job, cluster)
                active[cell] = job
                say(f"[study {study_name}] submitted {cell.name}: job {job.job_id} (log: {job.paths.stdout})")
            time.sleep(POLL_SECONDS)
            for cell, job in list(active.items()):
                if job.done():
                    del active[cell]
                    ok = cell_done(cell)
                    log = getattr(job, "paths", None)
                    where = log.stderr if log is not None else job.record.get("stderr")
                    say(f"[study {study_name}] {cell.name}: {'done' if ok else 'failed'} (job {job.job_id})")
                    if not ok:
                        failed.append(f"{cell.name} (log: {where})")
    except BaseException:  # Ctrl-C or an error here: no job goes on writing behind the user's back
        for job in active.values():
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - cancel the others all the same
                pass
        raise
    if failed:
        raise UserError(f"study cells failed: {', '.join(failed)}; run the study again to resume them")


def record_of(root: Path, cell: Path) -> dict | None:
    """The job record of a cell (tests, `cptlab study` reruns)."""
    path = _record_path(root, cell)
    return json.loads(path.read_text()) if path.exists() else None

