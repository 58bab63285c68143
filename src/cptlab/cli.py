"""The `cptlab` command. Thin: it parses arguments and calls the library.

Any bad input ends with one line on stderr naming what was wrong and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .errors import NumericalFault, UserError, closest, did_you_mean


# click's exception classes as typer raises them (typer 0.29 carries its own copy of click)
_UsageError, _ClickException = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
                                for name in ("UsageError", "ClickException"))


def _fail(message: str, code: int) -> None:
    print(f"cptlab: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


class _Commands(TyperGroup):
    """The verbs; an unknown one is one line with the closest verb, and so is every other usage error
    (an unknown option, a missing argument), like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # Exit(n) comes back as n
        except _UsageError as e:
            if e.ctx is None or type(e).__name__ == "NoArgsIsHelpError":  # bare `cptlab`: the help
                e.show()
                sys.exit(e.exit_code)
            names, ctx = [], e.ctx
            while ctx.parent is not None:
                names.insert(0, ctx.info_name)
                ctx = ctx.parent
            where = " ".join(["cptlab", *names])
            print(f"cptlab: error: {' '.join(e.format_message().split()).rstrip('.')} (see {where} --help)",
                  file=sys.stderr)
            sys.exit(2)
        except _ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            verbs = self.list_commands(ctx)
            _fail(f"unknown command {name!r}: {did_you_mean(closest(name, verbs))}expected one of "
                  f"{', '.join(verbs)} (see cptlab --help)", 2)
        return super().resolve_command(ctx, args)


# rich_markup_mode=None: help text shows "[PRESET|FILE.yaml]" and "eval.domains=[gcd]" literally
app = typer.Typer(cls=_Commands, rich_markup_mode=None, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="cptlab: continual post-training with GRPO, SDPO and SFT, and what each costs.")


def friendly(fn):
    """User errors -> one line + exit 2; numerical faults -> one line + exit 3; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e), 2)
        except NumericalFault as e:
            _fail(f"numerical fault: {e} (the last good checkpoint and the metrics so far are kept)", 3)
        except KeyboardInterrupt:
            _fail("interrupted; resume with --resume", 130)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                _fail(f"disk full while writing {e.filename or 'run files'}; what was written before is intact", 2)
            raise

    return wrapper


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.command()
@friendly
def run(
    args: Optional[list[str]] = typer.Argument(None, help="[PRESET|FILE.yaml] [key.sub=value ...]: a preset "
                                               "(default tiny) or YAML file, then overrides of any config key"),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default runs/<run.name>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Build or load the base model, run the continual stages, evaluate, and write the report.

    Any config key can be overridden after the preset as key.sub=value, for example:

    \b
    cptlab run smoke method.lr=1e-5 eval.num_prompts=64 eval.domains=[gcd,sorting]

    `cptlab presets` lists the presets; `cptlab config PRESET [key=value ...]` prints every key with its
    value and meaning.
    """
    from .api import run_continual
    from .config import load_config

    _configure_threads()
    if resume:
        if args:
            raise UserError("--resume takes the run's own config; drop the preset and overrides")
        root = run_continual(resume=resume)
    else:
        preset, overrides = _split_args(args)
        cfg = load_config(preset, overrides)
        root = run_continual(cfg, out_dir=out, overwrite=overwrite)
    from .ui import console

    console.print(f"run written to {root}", markup=False, soft_wrap=True)  # one line, also in an 80-column log


@app.command("config")
@friendly
def config_cmd(
    args: Optional[list[str]] = typer.Argument(None, help="[PRESET|FILE.yaml] [key.sub=value ...]"),
    markdown: bool = typer.Option(False, "--markdown", help="Print the config reference as Markdown (docs/config.md "
                                  "is the output without arguments; with a preset, its values beside the defaults)."),
) -> None:
    """Print the resolved config, every field with its value, its default where it differs, and its docstring."""
    import dataclasses
    import textwrap

    from .config import describe, load_config

    preset, overrides = _split_args(args)
    if markdown:
        from .config.describe import markdown as reference

        print(reference(load_config(preset, overrides) if args else None), end="")
        return
    for key, value, default, doc in describe(load_config(preset, overrides)):
        if dataclasses.is_dataclass(value):
            print(f"\n[{key}]  {doc}")
            continue
        changed = "" if value == default else f"   (default {default!r})"
        print(f"{key} = {value!r}{changed}")
        if doc:
            print(textwrap.indent(textwrap.fill(" ".join(doc.split()), 96), "    "))


@app.command("eval")
@friendly
def eval_cmd(
    model_dir: str = typer.Argument(..., help="Anything model.path takes: an HF model directory (e.g. "
                                    "runs/NAME/base), a .gguf file, or 'smollm2'."),
    domains: Optional[str] = typer.Option(None, "--domains", help="Comma-separated domains (default: all)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the results as JSON here."),
    show: int = typer.Option(0, "--show", help="Print N samples per domain (prompt, completion, answer, verdict)."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset or YAML file to start from (default: the "
                                         "preset of a packaged short name, e.g. smollm2, else tiny)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value config overrides"),
) -> None:
    """Evaluate a model (directory, GGUF file or short name) on held-out sets of the given domains."""
    from .config import ConfigError, eval_domains, load_config, resolve_eval
    from .evaluate import evaluate_all
    from .gguf_model import SHORT_NAMES
    from .models import load_pretrained, resolve_device
    from .rollout import SamplingSpec
    from .store import atomic_write_json
    from .tasks import check_domain, install_domains
    from .ui import console, eval_table, print_samples

    if show < 0:
        raise ConfigError("--show", show, "a number of samples >= 0")
    _configure_threads()
    extra = [f"eval.domains=[{domains}]"] if domains else []
    if config is None and model_dir in SHORT_NAMES:  # its prompt format, answer format and domains
        config = model_dir
    cfg = load_config(config, [f"model.path={model_dir}", *extra, *(overrides or [])])
    install_domains(cfg.domains)  # this process evaluates the config's domains
    names = eval_domains(cfg)
    for n in names:
        check_domain(n, "--domains")
    model, tokenizer, _ = load_pretrained(model_dir, cfg.model, resolve_device(cfg.run.device))
    ecfg = resolve_eval(cfg)
    results = evaluate_all(model, tokenizer, names, ecfg, cfg.prompt, SamplingSpec.for_eval(ecfg, cfg.rollout),
                           seed=cfg.run.seed)
    for name, r in results.items():
        if show:
            print_samples(name, r.rows or [], show)
    rows = {n: r.metrics() for n, r in results.items()}
    console.print(eval_table(f"evaluation of {model_dir}", rows))
    if out:
        atomic_write_json(Path(out), {"model": model_dir, "results": rows,
                                      "samples": {n: r.rows[:show] for n, r in results.items()} if show else {}})


@app.command()
@friendly
def report(run_dir: str = typer.Argument(..., help="A run directory.")) -> None:
    """(Re)write RUN_DIR/report.html from what the run directory holds."""
    from .api import write_summary_and_report
    from .store import RunStore

    store = RunStore.open(Path(run_dir))
    store.read_config()  # a corrupt config.yaml is one line, before anything is rewritten
    print(f"report written to {write_summary_and_report(store)}")


@app.command()
@friendly
def export(
    run_dir: str = typer.Argument(..., help="A run directory."),
    out: str = typer.Option(..., "--out", help="The Hugging Face directory to write (new or empty)."),
    stage: Optional[int] = typer.Option(None, "--stage", help="The model at the end of this stage (0: the base)."),
    step: Optional[int] = typer.Option(None, "--step", help="The model at this global step (a kept checkpoint)."),
    lora: str = typer.Option("merge", "--lora", help="LoRA runs: 'merge' (a full model, the adapters merged "
                             "in) or 'adapter' (a peft adapter on the run's base)."),
) -> None:
    """Write the run's model at a stage's end or a step (default: the newest kept) as a Hugging Face directory."""
    from .export import export_model

    path = export_model(run_dir, out, stage=stage, step=step, lora=lora)
    print(f"model written to {path}; evaluate it with: cptlab eval {path} --config {Path(run_dir) / 'config.yaml'}")
    if lora == "merge":
        print(f"in Python: AutoTokenizer.from_pretrained({str(path)!r}), "
              f"AutoModelForCausalLM.from_pretrained({str(path)!r}) (transformers)")


@app.command()
@friendly
def compare(
    run_dirs: list[str] = typer.Argument(..., help="Run directories to put side by side."),
    out: str = typer.Option("compare.html", "-o", "--out", help="Output HTML file."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Variant the others are tested against "
                                           "(a run name without its -s<seed> suffix; default: the first)."),
) -> None:
    """Compare runs side by side (one colour per run; mean, std, 95% intervals and tests over seeds): print
    the headline table and write the page. Warns when the runs differ in base model, domains or eval prompts."""
    from .analysis.compare import headline, mismatch_line
    from .compare_page import compare as compare_runs
    from .ui import console, plain_table

    for d in run_dirs:
        if not (Path(d) / "metrics.jsonl").exists():
            raise UserError(f"'{d}' is not a run directory (no metrics.jsonl)")
    result = compare_runs(run_dirs, out, baseline)
    if result.mismatches:
        print(f"cptlab: warning: {mismatch_line(result.mismatches)}", file=sys.stderr)
    console.print(plain_table("after the last stage, mean over seeds: accuracy in %, forgetting, BWT, FWT and "
                              "the difference [95% interval] in points", *headline(result.stats)))
    print(f"comparison written to {result.path}")


@app.command()
@friendly
def distance(
    run_dir: str = typer.Argument(..., help="A run directory (its base model is read from RUN_DIR/base)."),
    domains: Optional[str] = typer.Option(None, "--domains", help="Comma-separated domains (default: the run's)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output JSON (default RUN_DIR/distance.json)."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Prompts per domain (default: eval.num_prompts)."),
    model: Optional[str] = typer.Option(None, "--model", help="Embed with this HF model directory instead of the "
                                        "run's base (e.g. a GGUF run's dequantized weights, copied elsewhere)."),
) -> None:
    """MMD between the domains' prompts, embedded by the run's base model; writes distance.json."""
    from .analysis.distance import format_matrix, write_distance

    _configure_threads()
    names = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
    path, result = write_distance(run_dir, names, out, prompts, model)
    print(f"MMD^2 (RBF kernel, bandwidth {result['bandwidth']:.4g}; {result['prompts_per_domain']} prompts per "
          f"domain, {result['embedding']}):")
    print(format_matrix(result))
    print(f"written to {path}")


@app.command()
@friendly
def study(
    name: str = typer.Argument(..., help="A study preset (see `cptlab studies`) or a study YAML file."),
    out: str = typer.Option("runs/studies", "--out", help="Parent directory of the study's runs."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides for every run"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (default: the study's)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Cells run in parallel (separate processes; default 1). "
                                       "With --launcher submitit: most cells queued or running at once (default: all)."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated variants to run (default: all)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Variant the others are tested against "
                                           "(default: the study's first)."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine: --jobs) or submitit (each cell "
                                 "a Slurm job; pip install cptlab[cluster]; docs/cluster.md)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="submitit: slurm, local or auto (study.slurm.cluster; "
                                          "default auto)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="submitit: Slurm partition (default: the "
                                            "cluster's)."),
    gpus_per_cell: Optional[int] = typer.Option(None, "--gpus-per-cell", help="submitit: GPUs per cell (default 1)."),
    time_min: Optional[int] = typer.Option(None, "--time-min", help="submitit: minutes per cell job (default 720)."),
    log_folder: Optional[str] = typer.Option(None, "--log-folder", help="submitit: job logs (default "
                                             "OUT/STUDY/submitit)."),
) -> None:
    """Run a grid of variants x seeds and write the comparison (resumes finished and stopped cells)."""
    from .config import ConfigError
    from .study import run_study

    seed_list = None
    if seeds:
        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ConfigError("--seeds", seeds, "comma-separated integers, e.g. 0,1,2") from None
    _configure_threads()
    variant_list = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    slurm = dict(cluster=cluster, partition=partition, gpus_per_cell=gpus_per_cell, time_min=time_min,
                 log_folder=log_folder)
    run_study(name, out, overrides or [], seeds=seed_list, jobs=jobs, variants=variant_list, baseline=baseline,
              launcher=launcher, slurm=slurm)


@app.command("studies")
def studies_cmd() -> None:
    """List the shipped study presets with their questions."""
    from .study import load_study, study_names

    for name in study_names():
        print(f"{name:24s} {load_study(name).question}")


@app.command("domains")
@friendly
def domains_cmd(
    args: Optional[list[str]] = typer.Argument(None, help="[PRESET|FILE.yaml] [key.sub=value ...]: also list the "
                                               "domains its `domains` section defines or changes"),
    verifiers: bool = typer.Option(False, "--verifiers", help="List the verifiers a data-set domain can use."),
) -> None:
    """List the domains (built-in, and those of a config's `domains` section) with an example each: a
    generator's task, or a data set's verifier and split sizes."""
    from .config import load_config
    from .tasks import domain_table, install_domains
    from .ui import console, print_listing

    if verifiers:
        from .verifiers import table as verifier_table

        print_listing("verifiers (domains.NAME.verifier)", verifier_table(), "name",
                      {"answer_format": "answer format "}, ["needs", "options", "description"])
        console.print("python:MODULE:FUNCTION: your own, called as FUNCTION(completion, item, **verifier_options)")
        return
    prompt = None
    if args:
        cfg = load_config(*_split_args(args))
        install_domains(cfg.domains)  # the listing shows the config's domains too
        prompt = cfg.prompt
    rows = domain_table(prompt.style, prompt.answer_format) if prompt else domain_table()
    print_listing("domains (reasoning-gym generators and data sets)", rows, "name",
                  {"family": "family ", "ood_of": "OOD variant of ", "source": ""}, ["example", "solution"])


@app.command("presets")
def presets_cmd() -> None:
    """List the shipped presets with what each is for (`cptlab config PRESET` shows every setting)."""
    from .config import preset_description, preset_names

    for name in preset_names():
        print(f"{name:20s} {preset_description(name)}")


def _configure_threads() -> None:
    import os

    import torch

    if os.environ.get("CPTLAB_NUM_THREADS"):  # set by `cptlab study --jobs N` for its child runs
        torch.set_num_threads(max(1, int(os.environ["CPTLAB_NUM_THREADS"])))
    elif not torch.cuda.is_available():  # small CPU models: one thread per core, no oversubscription
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
