"""The library's entry points, the ones the CLI calls, and the two that `import cptlab` exports:

    run(preset | file | Config, out_dir=, overrides=[...]) -> Path    `cptlab run` from Python
    load_run(run_dir) -> RunResults       a run as plain tables: accuracy matrix, forgetting, drift, samples
    run_continual(cfg | resume=DIR) -> Path       run (or resume) a continual study, then its summary and report
    write_summary_and_report(run_dir) -> Path     rebuild summary.json (and report.html) from metrics.jsonl

The driver (continual.py) runs the stages; this module puts what comes after it (the analyses and the
pages, the headline in the terminal), so that the driver never imports the report. The experiment
trackers (run.report_to) are fed by the run store (trackers.py); their packages are checked here,
before any work.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .continual import drive
from .errors import UserError
from .store import RunStore


def write_summary_and_report(run_dir: Path | str | RunStore, report: bool = True) -> Path | None:
    """summary.json from the run's records (the source of truth), then report.html unless `report` is
    false; returns the report's path (None without one)."""
    from .analysis.summary import build_summary

    store = run_dir if isinstance(run_dir, RunStore) else RunStore.open(Path(run_dir))
    store.write_json("summary.json", build_summary(store.read_metrics()))
    if not report:
        return None
    from .report import write_report

    return write_report(store.root)


def _finish(cfg: Config, store: RunStore) -> None:
    write_summary_and_report(store, cfg.run.report)


def print_outcome(run_dir: Path | str) -> None:
    """The end of a run in the terminal: the report's headline sentences (report.headline_text, the
    first screen of report.html) and the report's path."""
    from .report import headline_text
    from .ui import console

    if console.quiet:  # a torchrun rank other than 0
        return
    root = Path(run_dir)
    try:
        sentences = headline_text(root)
    except UserError:
        sentences = []
    for sentence in sentences:
        console.print(f"- {sentence}", markup=False, soft_wrap=True)
    report = root / "report.html"
    console.print(f"report: {report.resolve()}" if report.is_file() else
                  f"report: none (run.report is false; `cptlab report {root}` writes it)", markup=False, soft_wrap=True)


def run_continual(cfg: Config | None = None, *, out_dir: str | None = None, resume: str | None = None,
                  overwrite: bool = False) -> Path:
    """Run (or resume) a continual study; returns the run directory, with summary.json and report.html
    (run.report) written at the end, also after a failure that left records; the terminal gets the
    report's headline and path at the end (print_outcome). Optional packages the config needs (peft for
    LoRA, gguf for a .gguf model, the trackers of run.report_to) are checked first, before any work."""
    from .extras import check_extras

    if cfg is not None:
        check_extras(cfg)
    elif resume is not None and (Path(resume) / "config.yaml").is_file():
        from .config import Config, from_dict, load_source

        # typed, not validated (the driver validates it once; validation reads every data-set domain)
        check_extras(from_dict(Config, load_source(str(Path(resume) / "config.yaml"))))
    root = drive(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, finish=_finish)
    print_outcome(root)
    return root


def run(config: str | Path | Config | None = None, *, out_dir: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False, resume: str | Path | None = None) -> Path:
    """`cptlab run` from Python: a preset name or YAML file (None: the default preset, tiny) or a Config,
    then dotted `key.sub=value` overrides, as on the command line; runs it into `out_dir` (default
    runs/<run.name>) and returns the run directory. `resume=DIR` continues a stopped run (no config
    then). A bad input raises cptlab.errors.UserError (ConfigError for the config) naming the field."""
    from .config import (absolute_sources, apply_overrides, from_dict, load_config, refuse_unused_settings, to_dict,
                         validate)
    from .errors import UserError

    if resume is not None:
        if config is not None or overrides:
            raise UserError("resume takes the run's own config; drop the config and overrides")
        return run_continual(resume=str(resume))
    if isinstance(config, Config):
        cfg = config
        if overrides:
            cfg = from_dict(Config, apply_overrides(to_dict(config), list(overrides)))
            absolute_sources(cfg)
            validate(cfg)
            refuse_unused_settings(cfg)
    else:
        cfg = load_config(None if config is None else str(config), list(overrides))
    return run_continual(cfg, out_dir=None if out_dir is None else str(out_dir), overwrite=overwrite)


def load_run(run_dir: Path | str):
    """A run directory (finished or not) as plain tables: cptlab.results.RunResults, with the accuracy
    matrix, forgetting, drift, samples, the summary and the records."""
    from .results import load_results

    return load_results(run_dir)


__all__ = ["run", "load_run", "run_continual", "write_summary_and_report"]
