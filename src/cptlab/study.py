"""Studies: a grid of runs (variants x seeds) over one run preset, then a side-by-side comparison.

A study file (presets/studies/NAME.yaml) names a run preset, the seeds, and the variants as lists of
dotted overrides. `run_study` runs (or resumes) each cell under <out>/<study>/<variant>-s<seed>/ and
writes <out>/<study>/compare.html. Finished cells are skipped, so a stopped study just runs again.
Launchers: in this process (`--jobs 1`), as `cptlab run` processes (`--jobs N`), or as jobs through
submitit on Slurm (`--launcher submitit`, submit.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import ConfigError, from_dict, load_config, read_yaml
from .errors import UserError, closest, did_you_mean
from .submit import SlurmConfig
from .ui import console


@dataclass
class StudyConfig:
    preset: str = "tiny"
    """The run preset (or YAML file) every cell starts from."""
    description: str = ""
    question: str = ""
    """The study's question, shown in the comparison."""
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    """Applied to every cell, before the variant's own overrides."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """name -> dotted overrides, e.g. {grpo: [method.name=grpo], sdpo: [method.name=sdpo]}."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """How `--launcher submitit` submits the cells (partition, GPUs, time; see submit.py, docs/cluster.md)."""


def _say(message: str) -> None:
    console.print(message, markup=False, highlight=False)  # "[study x]" is not rich markup


def study_names() -> list[str]:
    root = resources.files("cptlab") / "presets" / "studies"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_study(name: str) -> StudyConfig:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"study file '{name}' not found")
        data = read_yaml(path.read_text(), name)
    else:
        if name not in study_names():
            raise UserError(f"unknown study {name!r}: {did_you_mean(closest(name, study_names()))}expected one of "
                            + ", ".join(study_names()) + " (`cptlab studies` describes each) or a .yaml file")
        data = read_yaml((resources.files("cptlab") / "presets" / "studies" / f"{name}.yaml").read_text(),
                          f"study {name}")
    study = from_dict(StudyConfig, data, "study")
    if not study.variants:
        raise ConfigError("study.variants", study.variants, "at least one variant")
    for variant, extra in study.variants.items():  # validate every cell before running any
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise ConfigError(f"study.variants.{variant}", extra, "a list of key.sub=value overrides")
        load_config(study.preset, [*study.overrides, *extra])
    return study


def cell_done(cell: Path) -> bool:
    """Whether the cell's run is finished (its summary.json says complete)."""
    summary = cell / "summary.json"
    try:
        return summary.exists() and bool(json.loads(summary.read_text()).get("complete"))
    except ValueError:
        return False


def run_cell(preset: str, overrides: list[str], cell: Path) -> None:
    """Run one cell in this process: start it, or resume it where a config.yaml says it started."""
    from .api import run_continual

    if (cell / "config.yaml").exists():
        run_continual(resume=str(cell))
    else:
        run_continual(load_config(preset, overrides), out_dir=str(cell), overwrite=True)


def select_variants(study: StudyConfig, names: list[str] | None) -> dict[str, list[str]]:
    """The study's variants, or only `names` (in the study's order); an unknown name is a ConfigError."""
    if not names:
        return study.variants
    unknown = [n for n in names if n not in study.variants]
    if unknown:
        raise ConfigError("--variants", ",".join(unknown), "variants of this study: " + ", ".join(study.variants))
    return {k: v for k, v in study.variants.items() if k in names}


LAUNCHERS = ("local", "submitit")


def run_study(name: str, out_dir: str = "runs/studies", extra_overrides: list[str] | None = None,
              seeds: list[int] | None = None, jobs: int | None = None, variants: list[str] | None = None,
              baseline: str | None = None, launcher: str = "local", slurm: dict | None = None) -> Path:
    """Run (or resume) every cell of a study (or of the `variants` named), `jobs` at a time, then write
    <out>/<study>/compare.html comparing those cells and print its statistics table (every variant
    against `baseline`, default the first variant run).

    launcher 'local': jobs 1 (the default) runs the cells one after the other in this process; jobs > 1
    as parallel `cptlab run` processes (CPU threads split between them; on a GPU they share it), each
    logging to <cell>.log; the base model is built and cached once beforehand.
    launcher 'submitit': each cell a job (submit.py), at most `jobs` queued or running at once (None:
    all); `slurm` overrides fields of the study's `slurm` section (SlurmConfig).
    """
    from .compare_page import write_compare

    if launcher not in LAUNCHERS:
        raise ConfigError("--launcher", launcher, "one of " + ", ".join(LAUNCHERS))
    if launcher == "submitit":
        from .submit import require_submitit

        require_submitit()  # before any work
    study = load_study(name)
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ConfigError("--jobs", jobs, "an integer >= 1")
    slurm_cfg = _slurm_config(study, slurm)
    chosen = select_variants(study, variants)
    if baseline is not None and baseline not in chosen:
        raise ConfigError("--baseline", baseline, "one of the variants run: " + ", ".join(chosen))
    study_name = Path(name).stem
    root = Path(out_dir) / study_name
    cells: list[tuple[Path, list[str]]] = []
    arms: dict[str, list[Path]] = {}
    for variant, extra in chosen.items():
        for seed in (seeds if seeds else study.seeds):
            overrides = [*study.overrides, *extra, *(extra_overrides or []), f"run.seed={seed}",
                         f"run.name={variant}-s{seed}"]
            load_config(study.preset, overrides)  # CLI overrides validated before any work
            cells.append((root / f"{variant}-s{seed}", overrides))
            arms.setdefault(variant, []).append(root / f"{variant}-s{seed}")
    pending = []
    for cell, overrides in cells:
        if cell_done(cell):
            _say(f"[study {study_name}] {cell.name}: done, skipped")
        else:
            pending.append((cell, overrides))
    if launcher == "submitit" and pending:
        from .submit import run_cells

        run_cells(study.preset, study_name, root, pending, slurm_cfg, jobs, _say)
    elif (jobs or 1) == 1 or len(pending) <= 1:
        for cell, overrides in pending:
            _say(f"[study {study_name}] running {cell.name}")
            run_cell(study.preset, overrides, cell)
    elif pending:
        _run_parallel(study, study_name, root, pending, jobs)
    out = write_compare([cell for cell, _ in cells], root / "compare.html", baseline)
    _say(f"[study {study_name}] comparison written to {out}")
    _say(study_statistics(arms, baseline))
    return out


def _slurm_config(study: StudyConfig, slurm: dict | None) -> SlurmConfig:
    """The study's `slurm` section with the CLI's settings (those not None) over it, checked."""
    from dataclasses import asdict

    from .submit import check_slurm_config

    merged = {**asdict(study.slurm), **{k: v for k, v in (slurm or {}).items() if v is not None}}
    cfg = from_dict(SlurmConfig, merged, "study.slurm")
    check_slurm_config(cfg)
    return cfg


def study_statistics(arms: dict[str, list[Path]], baseline: str | None = None) -> str:
    """The statistics table of compare.html as text (analysis/compare.py), for the study's end."""
    from .analysis.compare import RunData, build_table, format_text
    from .store import read_jsonl

    data = {v: [RunData(c.name, c, read_jsonl(c / "metrics.jsonl")) for c in cells] for v, cells in arms.items()}
    return format_text(build_table(data, baseline))


def _run_parallel(study: StudyConfig, study_name: str, root: Path, pending: list, jobs: int) -> None:
    import os

    from .basemodel import base_model
    from .gguf_model import find_gguf
    from .models import resolve_device
    from .tasks import domains_installed

    first = load_config(study.preset, pending[0][1])
    # build and cache the base model (or dequantize the GGUF file) once, not once per process
    if not first.model.path or find_gguf(first.model.path):
        import gc

        import torch

        with domains_installed(first.domains):  # the warm-up may draw from the config's own domains
            base_model(first, resolve_device(first.run.device))
        gc.collect()  # the children need the GPU memory the warm-up held (17 GiB of 80 for gpu_model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    root.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("CPTLAB_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "CPTLAB_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    # cells sharing one GPU: growable segments fragment its memory less (9 continual cells of the 76M
    # model held 8-9.5 GiB each on an 80 GB H100 and one died of OOM without it); the user's setting wins
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    queue, running, failed = list(pending), [], []
    try:
        _schedule(study, study_name, root, queue, running, failed, jobs, env, _gpu_ids())
    except BaseException:  # Ctrl-C or an error here: do not leave orphaned runs behind
        for _, proc, log, _ in running:
            proc.terminate()
            proc.wait()
            log.close()
        raise
    if failed:
        raise UserError(f"study cells failed: {', '.join(failed)} (see their .log files in {root}); "
                        "run the study again to resume them")


def _gpu_ids() -> list[str]:
    """The GPUs cells may use: CUDA_VISIBLE_DEVICES's entries, else every device torch sees (none on CPU)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build
        return []


def _schedule(study, study_name, root, queue, running, failed, jobs, env, gpus: list[str] | None = None) -> None:
    """Keep `jobs` cell processes running until the queue is empty and all have exited. With several GPUs,
    each new cell goes to the GPU that runs the fewest cells (its CUDA_VISIBLE_DEVICES names only it)."""
    import subprocess
    import sys
    import time

    gpus = gpus or []
    while queue or running:
        while queue and len(running) < jobs:
            cell, overrides = queue.pop(0)
            if (cell / "config.yaml").exists():
                args = ["run", "--resume", str(cell)]
            else:
                args = ["run", study.preset, *overrides, "--out", str(cell), "--overwrite"]
            log = open(root / f"{cell.name}.log", "w")
            cell_env = env
            if len(gpus) > 1:
                load = {g: sum(1 for item in running if item[3] == g) for g in gpus}
                gpu = min(gpus, key=lambda g: (load[g], gpus.index(g)))
                cell_env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
            else:
                gpu = None
            proc = subprocess.Popen([sys.executable, "-m", "cptlab.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=cell_env)
            running.append((cell, proc, log, gpu))
            where = f" on GPU {gpu}" if gpu is not None else ""
            _say(f"[study {study_name}] started {cell.name}{where} (log: {root / (cell.name + '.log')})")
        time.sleep(1.0)
        for item in list(running):
            cell, proc, log, _ = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                ok = proc.returncode == 0
                _say(f"[study {study_name}] {cell.name}: {'done' if ok else f'failed (exit {proc.returncode})'}")
                if not ok:
                    failed.append(cell.name)
