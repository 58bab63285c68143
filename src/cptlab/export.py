"""`cptlab export`: a run's model at one point as a standard Hugging Face directory.

The directory holds config.json, model.safetensors, the tokenizer files and generation_config.json
(greedy decoding with the run's evaluation budget, the settings its accuracies were measured with), and
cptlab_export.json (which run, checkpoint, stage and step, the accuracies recorded there, how to
evaluate it again, whether AutoTokenizer reads the tokenizer right). `transformers.AutoTokenizer` and
`AutoModelForCausalLM.from_pretrained(DIR)` and `cptlab eval DIR --config RUN/config.yaml` load it: the
tiny model's character tokenizer is written in its byte-level spelling (models.byte_level_form), which
the tokenizer class transformers picks for a qwen2 model reads right, and every merged export checks
that AutoTokenizer gives the run's token ids (a warning line and `auto_tokenizer: false` where not).

What can be exported is what the run kept: the base model (`--stage 0`, from RUN/base), every stage's
end when `run.keep_stage_models` kept it (on by default for small models), and the newest checkpoint.
A LoRA run is written merged (a full model, the default) or as a peft adapter whose
`base_model_name_or_path` is the run's base model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .metric_names import EVAL, GREEDY_ACC


@dataclass(frozen=True)
class Point:
    """A model the run kept: its stage, step within the stage, global step, and where it lives."""

    stage: int
    step: int
    global_step: int
    stage_end: bool
    path: Path | None  # a checkpoint directory; None: the base model (RUN/base or model.path)

    def describe(self) -> str:
        if self.path is None:
            return "--stage 0 (the base model)"
        if self.stage_end:
            return f"--stage {self.stage} (its end, global step {self.global_step})"
        return f"--step {self.global_step} (stage {self.stage} step {self.step})"


def available(root: Path) -> list[Point]:
    """The models a run kept, in training order: the base, then its complete checkpoints."""
    from .store import RunStore

    points = [Point(0, 0, 0, True, None)]
    for path, state in RunStore(root)._checkpoint_states():
        if state.get("stage", 0) > 0:
            points.append(Point(int(state["stage"]), int(state["step"]), int(state["global_step"]),
                                bool(state.get("stage_done")), path))
    return points


def pick(points: list[Point], stage: int | None, step: int | None) -> Point:
    """The point `--stage` (a stage's end) or `--step` (a global step) names; the newest without either."""
    if stage is not None and step is not None:
        raise UserError("export: give --stage or --step, not both")
    if stage is None and step is None:
        return points[-1]
    flag, wanted = ("--stage", stage) if stage is not None else ("--step", step)
    for p in points:
        if (stage is not None and p.stage == stage and p.stage_end) or (step is not None and p.global_step == step
                                                                          and p.path is not None):
            return p
    return _missing(points, flag, wanted)


def _missing(points: list[Point], flag: str, value: int):
    listing = ", ".join(p.describe() for p in points)
    raise UserError(f"export: {flag} {value}: the run kept no model there; available: {listing} (every stage's "
                    "model is kept with run.keep_stage_models=true)")


def _generation_config(model, tokenizer, max_new_tokens: int) -> None:
    """Greedy decoding within the evaluation budget, stopping at every stop token the run stopped at."""
    from .rollout import stop_token_ids

    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    gen.max_new_tokens = max_new_tokens
    gen.eos_token_id = sorted(stop_token_ids(model, tokenizer))
    gen.pad_token_id = tokenizer.pad_token_id


def export_model(run_dir: Path | str, out: Path | str, *, stage: int | None = None, step: int | None = None,
                 lora: str = "merge") -> Path:
    """Write the model at `--stage`/`--step` (default: the newest kept) of the run in `run_dir` to `out`."""
    import torch

    from .checkpoint import load_weights
    from .config import load_run_config, resolve_eval
    from .lora import apply_lora
    from .models import byte_level_form, load_model
    from .variants import variant_of

    root, out = Path(run_dir), Path(out)
    if not (root / "config.yaml").is_file():
        raise UserError(f"export: '{root}' is not a cptlab run directory (no config.yaml)")
    if lora not in ("merge", "adapter"):
        raise UserError(f"export: --lora {lora!r}: expected 'merge' (a full model) or 'adapter' (peft)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export: --out '{out}' already exists and is not empty; choose a new directory")
    cfg = load_run_config(root / "config.yaml")
    point = pick(available(root), stage, step)
    if lora == "adapter" and cfg.model.lora.rank == 0:
        raise UserError("export: --lora adapter: this run trained all weights (model.lora.rank = 0); export it "
                        "with --lora merge (a full model)")
    if lora == "adapter" and point.path is None:
        raise UserError("export: --lora adapter: --stage 0 is the base model itself, which has no adapter; "
                        "export it with --lora merge")
    base_dir = _base_dir(root, cfg)
    device = torch.device("cpu")
    model, tokenizer = load_model(str(base_dir), cfg.model, device)
    if point.path is not None:
        model = apply_lora(model, cfg.model.lora, seed=cfg.run.seed)
        load_weights(point.path, model)
    _generation_config(model, tokenizer, resolve_eval(cfg).max_new_tokens)
    tokenizer = byte_level_form(tokenizer) or tokenizer  # what AutoTokenizer reads right (models.byte_level_form)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        # this process's own copy of the model: nothing else shares its weights, so a merge may be in place
        if variant_of(model).save_pretrained(model, tmp, adapter=lora == "adapter"):
            _point_adapter_at(tmp, base_dir)
        tokenizer.save_pretrained(tmp)
        provenance = _provenance(root, point, lora, out)
        if lora == "merge":
            provenance["auto_tokenizer"] = auto_tokenizer_agrees(tmp, tokenizer, shown=out)
        (tmp / "cptlab_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        _shareable(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


PROBE = "sort asc: 34 0 27\n  two spaces; <answer>3 4</answer> end\n\n"
"""Text whose round trip through AutoTokenizer an export checks: spaces, newlines, the answer tags (only
characters of the tiny model's vocabulary: outside it, Qwen2Tokenizer drops what the run reads as <unk>)."""


def auto_tokenizer_agrees(directory: Path, tokenizer, shown: Path | None = None) -> bool:
    """Whether `AutoTokenizer.from_pretrained(directory)` encodes PROBE (and the tokenizer's own special
    tokens) to the ids `tokenizer` gives and decodes them back to the same text; where it does not, one
    line tells the user which class reads the directory right (`shown`: the directory's name in it)."""
    from transformers import AutoTokenizer

    from .ui import console

    text = PROBE + "".join(tokenizer.all_special_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        auto = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        same = auto(text, add_special_tokens=False)["input_ids"] == ids and auto.decode(ids) == tokenizer.decode(ids)
        name = type(auto).__name__
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        same, name = False, f"an error ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
    if not same:
        console.print(f"warning: AutoTokenizer reads {shown or directory}'s tokenizer differently ({name}); load it with "
                      "transformers.PreTrainedTokenizerFast.from_pretrained", markup=False, soft_wrap=True)
    return same


def _shareable(directory: Path) -> None:
    """mkdtemp makes 0700 and some writers 0600: give the directory and its files the usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _base_dir(root: Path, cfg) -> Path:
    """The run's base model directory: RUN/base, else (a GGUF or format-warmed base) where it was loaded."""
    if (root / "base" / "config.json").is_file():
        return root / "base"
    try:
        source = json.loads((root / "base" / "source.json").read_text())
    except (OSError, ValueError):
        source = {}
    for key in ("cache", "dequantized"):
        where = (source.get("warmup") or {}).get(key) if key == "cache" else source.get(key)
        if where and (Path(where) / "config.json").is_file():
            return Path(where)
    raise UserError(f"export: no base model for '{root}' (no base/config.json, and the weights named in "
                    "base/source.json are not on this machine)")


def _point_adapter_at(adapter_dir: Path, base_dir: Path) -> None:
    """peft writes the base model's name as it was loaded; make it the absolute base directory, so that
    from_pretrained(adapter_dir) finds the base wherever it is called from."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    path.write_text(json.dumps(config, indent=2) + "\n")


def _provenance(root: Path, point: Point, lora: str, out: Path) -> dict:
    from .store import read_jsonl

    records = read_jsonl(root / "metrics.jsonl") if (root / "metrics.jsonl").is_file() else []
    accuracy = {r["domain"]: r.get(GREEDY_ACC) for r in records if r.get("event") == EVAL
                and r.get("stage") == point.stage and r.get("global_step") == point.global_step and "domain" in r}
    return {"run": str(root.resolve()), "checkpoint": point.path.name if point.path else "base", "stage": point.stage,
            "step": point.step, "global_step": point.global_step, "lora": lora, "greedy_acc": accuracy,
            "evaluate": f"cptlab eval {out} --config {root / 'config.yaml'}"}
