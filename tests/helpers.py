"""What several test modules share: tiny configs and models, run records, a crash in-process, gloo ranks
spawned on CPU, CLI error checks, hand-written run directories. Fixtures live in conftest.py; no test
module imports another."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

from cptlab import distributed as D
from cptlab.config import ModelConfig, PromptConfig, RolloutConfig, load_config
from cptlab.api import run_continual
from cptlab.methods import MethodContext, build_method
from cptlab.metric_names import is_timing  # wall-clock fields, which differ between identical runs
from cptlab.models import build_tiny_model, build_tokenizer
from cptlab.rollout import make_generator
from cptlab.tasks import make_split
from cptlab.trainer import TrainSampler

# -- run records -------------------------------------------------------------------------------------



def records(run_dir: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    """metrics.jsonl without wall-clock fields (and without the keys in `drop`, e.g. "base", whose
    warm-up source differs between a run that built its base and one that read it from a cache)."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not is_timing(k) and k not in drop})
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path: compare two to see that not a byte changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the smoke preset shrunk to seconds ----------------------------------------------------------------

TINY = ["warmup.enabled=false", "eval.domains=[arithmetic]", "eval.num_prompts=2", "eval.num_samples=0",
        "eval.max_new_tokens=8", "eval.every=0", "eval.drift=false", "rollout.max_new_tokens=8",
        "rollout.group_size=2", "method.prompts_per_step=2", "run.report=false", "run.device=cpu"]
"""Overrides of the smoke preset for in-process runs of seconds: no warm-up, one eval domain, 2 prompts x
2 samples, 8 new tokens."""


def tiny_config(*extra: str):
    """The smoke preset with TINY and then `extra` overrides applied."""
    return load_config("smoke", [*TINY, *extra])


class Crash(BaseException):
    """Stands in for SIGKILL in-process (nothing in cptlab catches a BaseException)."""


def run_until_crash(cfg, out, stage: int, step: int) -> None:
    """run_continual(cfg) into `out`, killed (Crash) when stage `stage` draws the prompts of step `step`."""
    original = TrainSampler.batch

    def batch(self, s, n):
        if self.stage_index == stage and s == step:
            raise Crash
        return original(self, s, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainSampler, "batch", batch)
        with pytest.raises(Crash):
            run_continual(cfg, out_dir=str(out))


# -- the command line ------------------------------------------------------------------------------------

def one_error_line(result) -> str:
    """The single line a refused command (a typer.testing Result) printed on stderr; no traceback, and
    the command ended through its own exit, not an exception that escaped it."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, one line on stderr holding every needle, no traceback; returns the line."""
    assert result.exit_code == code, result.output
    line = one_error_line(result)
    for needle in needles:
        assert needle in line, line
    return line


# -- tiny models and a planted batch -------------------------------------------------------------------

def new_tiny_model():
    """A fresh tiny model (train mode), the weights of the `tiny_model` fixture: 1 layer, hidden 32."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, build_tokenizer(), seed=0)


def noisy_model(tokenizer, arch="qwen2", seed=1, scale=0.3):
    """A random model with large enough weights that greedy decoding is not one repeated token."""
    m = build_tiny_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64), tokenizer, seed=0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


BATCH_ROLLOUT = RolloutConfig(group_size=4, max_new_tokens=12)
"""The rollout settings of method_and_batch's batches: groups of 4, 12 new tokens."""


BATCH_LENGTHS = [12, 3, 7, 1, 12, 5, 2, 9, 4, 12, 6, 8, 1, 2, 3, 11]
"""Planted completion lengths: ragged, so every loss type weights rows differently."""


def method_and_batch(model, mcfg):
    """A method and a 16-row batch with planted ragged lengths, advantages and distilled rows (a
    random tiny model solves nothing, so without them every GRPO and SDPO signal would be zero)."""
    tokenizer = build_tokenizer()
    ctx = MethodContext(tokenizer, PromptConfig(), BATCH_ROLLOUT, torch.device("cpu"), base=new_tiny_model().eval())
    method = build_method(mcfg, ctx, model)
    examples = make_split("arithmetic", "train", 16 if mcfg.name == "sft" else 4)  # 16 rows either way
    batch = method.make_batch(model, examples, make_generator(0))
    ro = batch.rollout
    lengths = torch.tensor(BATCH_LENGTHS).clamp(max=ro.completion_mask.shape[1])
    ro.completion_mask = (torch.arange(ro.completion_mask.shape[1])[None] < lengths[:, None]).float()
    g = torch.Generator().manual_seed(1)
    if batch.advantages is not None:
        batch.advantages = torch.randn(len(batch), generator=g)
    if batch.distill is not None:
        batch.distill = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0])
    if mcfg.updates_per_batch == 1 and mcfg.name != "sft":  # a ratio != 1, so that clipping acts
        batch.old_logprobs = ro.logprobs(model).detach() + 0.3 * torch.randn(ro.completion_mask.shape, generator=g)
    return method, batch


# -- gloo ranks on CPU ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_quietly() -> None:
    """End a rank whose check passed without running C++ static destructors: at interpreter exit a
    worker thread still joinable aborts the process now and then ("terminate called without an active
    exception", SIGABRT), which mp.spawn reports as a failure although every assertion held."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_entry(rank: int, world: int, port: int, body, args: tuple, timeout_minutes: float) -> None:
    """What torchrun would set, then init_from_env, then the check; exceptions reach the parent."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_from_env("cpu", timeout_minutes=timeout_minutes)
    try:
        assert (info.rank, info.world_size, info.backend, info.device.type) == (rank, world, "gloo", "cpu")
        assert D.rank() == rank and D.world_size() == world and D.is_main() == (rank == 0)
        body(info, *args)
    finally:
        D.destroy()
    exit_quietly()


def spawn(body, *args, world: int = 2, timeout_minutes: float = 3) -> None:
    """Run body(info, *args) on `world` gloo ranks (torch.multiprocessing, as torchrun would set them
    up); a collective waits at most timeout_minutes for the others. `body` must be a module-level
    function (the ranks import it by name)."""
    mp.spawn(_rank_entry, args=(world, free_port(), body, args, timeout_minutes), nprocs=world, join=True)


class TwoDtypes(nn.Module):
    """A float32 and a float64 layer (two reduction buffers), one layer only rank 0 uses, one unused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2).double()
        self.only_rank0 = nn.Linear(4, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x, use_extra: bool):
        out = self.b(torch.tanh(self.a(x)).double())
        if use_extra:
            out = out + self.only_rank0(x).double()
        return out


def two_dtypes_batch():
    """8 rows of TwoDtypes input (float32) and targets (float64)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g, dtype=torch.float64)


# -- hand-written run directories (reports, comparisons) ---------------------------------------------

EVIL_HTML = "<script>alert(1)</script> \x1b[31mred\x1b[0m"
"""Model text that a report must show as text: markup and a terminal escape."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PROMPTS = 200
"""Held-out prompts per domain in the hand-written runs: accuracies are whole counts of them."""


def images(text: str) -> list[bytes]:
    """The PNGs embedded in an HTML page, decoded."""
    return [base64.b64decode(b) for b in IMG_RE.findall(text)]


def make_run(root: Path, *, name: str = "toy", seed: int = 0, lr: float = 1e-3, steps: int = 8,
             domains=("arithmetic", "sorting", "arithmetic_ood"), methods=("grpo", "sdpo"),
             drift: bool = True, fault: bool = False, summary: dict | None = None) -> Path:
    """A plausible run directory written by hand: evals every 2 steps (with per-prompt records: the first
    `hits` of 200 prompts right), drift per stage, samples. Each step adds 8 hits (+4 points) on the
    trained domain and takes 3 (-1.5 points) from the others."""
    root.mkdir(parents=True)
    trained = [d for d in domains if not d.endswith("_ood")]
    plan = [{"domain": trained[i % len(trained)], "steps": steps, "method": m} for i, m in enumerate(methods)]
    config = {"run": {"name": name, "seed": seed, "out_dir": "runs"}, "method": {"lr": lr},
              "stages": [{"domain": p["domain"], "steps": steps, "method": {"name": p["method"]}} for p in plan]}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    hits = {d: 40 + 10 * k + 4 * seed for k, d in enumerate(domains)}
    records = [{"event": "run_start", "name": name, "base": {"source": "built", "parameters": 80768},
                "domains": list(domains), "stages": plan}]

    def evaluate(stage, stage_name, step, gstep, final):
        records.extend({"event": "eval", "stage": stage, "stage_name": stage_name, "step": step, "global_step": gstep,
                        "final": final, "domain": d, "greedy_acc": hits[d] / PROMPTS, "sampled_acc": hits[d] / PROMPTS / 2,
                        "format_rate": 0.9, "mean_length": 12.0, "num_prompts": PROMPTS} for d in domains)
        samples = {d: [{"question": f"{d} question {i} <b>bold</b>",
                        "completion": EVIL_HTML if i == 0 else " <answer>4</answer>", "correct": i == 1,
                        "well_formed": i == 1} for i in range(3)] for d in domains}
        (root / "samples").mkdir(exist_ok=True)
        (root / "samples" / f"stage{stage}-step{step}.json").write_text(json.dumps(samples))
        per_prompt = {d: {"prompts": PROMPTS, "config_sha256": f"c-{d}", "prompts_sha256": f"p-{d}",
                          "greedy": "1" * hits[d] + "0" * (PROMPTS - hits[d])} for d in domains}
        (root / "evals").mkdir(exist_ok=True)
        (root / "evals" / f"stage{stage}-step{step}.json").write_text(json.dumps(
            {"stage": stage, "stage_name": stage_name, "step": step, "global_step": gstep, "final": final,
             "domains": per_prompt}))

    evaluate(0, "base", 0, 0, True)
    gstep = 0
    for s, p in enumerate(plan, start=1):
        for step in range(1, steps + 1):
            gstep += 1
            hits[p["domain"]] = min(PROMPTS, hits[p["domain"]] + 8)
            for d in domains:
                if d != p["domain"] and not d.startswith(p["domain"]):
                    hits[d] = max(0, hits[d] - 3)
            acc = hits[p["domain"]] / PROMPTS
            rec = {"event": "train", "stage": s, "domain": p["domain"], "method": p["method"], "step": step,
                   "global_step": gstep, "reward": acc, "accuracy": acc,
                   "entropy": 2.5 - 0.05 * gstep, "kl_to_base": 0.01 * gstep, "response_length": 10 + math.sin(gstep),
                   "loss": 0.1, "grad_norm": 1.0}
            if p["method"] == "sdpo":
                rec.update({"sdpo/divergence": 0.01, "sdpo/top1_agreement": 0.9, "teacher/with_demo_frac": 0.5})
            records.append(rec)
            if fault and s == len(plan) and step == steps // 2:
                records.append({"event": "fault", "stage": s, "global_step": gstep, "reason": "loss is NaN <x>",
                                "action": "stopped"})
                break
            if step % 2 == 0 or step == steps:
                evaluate(s, p["domain"], step, gstep, step == steps)
        else:
            records.append({"event": "stage_end", "stage": s, "domain": p["domain"], "method": p["method"],
                            "steps": steps, "global_step": gstep})
            if drift:
                records.append({"event": "drift", "stage": s, "global_step": gstep, "param/rel_l2_base": 0.01 * s,
                                "param/rel_l2_base/attention": 0.02 * s, "param/rel_l2_base/mlp": 0.015 * s,
                                "param/sparsity": 0.5, "param/num_tensors": 12.0, "response/kl_to_base": 0.1 * s,
                                "response/answer_changed_frac": 0.2 * s, "artifacts/repetition_rate": 0.05 * s,
                                "artifacts/malformed_rate": 0.1 / s, "artifacts/char_level": 1.0})
            continue
        break
    if not fault:
        records.append({"event": "run_end", "seconds": 12.0, "global_step": gstep})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def sdpo_config(**flat):
    """An SDPO section from its flat spelling (teacher_mode=..., ema_rate=..., demo_source=...): the old
    keys are still read (config.build.upgrade_flat_sdpo), which this also exercises."""
    from cptlab.config import SDPOConfig, from_dict

    return from_dict(SDPOConfig, flat, "sdpo")
