"""Every speed figure of the speed issue in one call on one GPU, side by side, with the goals.

    python benchmarks/bench_gpu_all.py [--smollm2 DIR] [--out-dir DIR] [--budget 570] [--sections a,b,...]
    python benchmarks/bench_gpu_all.py --gpus 2 [--out-dir DIR]        # ddp vs fsdp under torchrun

Each section is one of the other benchmark scripts in a subprocess of its own (a crash, an
out-of-memory or a CUDA error in one loses only that one), with a time limit; the whole run stays
inside --budget seconds (sections that no longer fit are skipped and say so). Each section's full
output goes to OUT/<section>.log and its figures to OUT/<section>.json, OUT being --out-dir, else
$OUT, else ./bench_out; the summary (figures, ratios, goals) is printed last and written to
OUT/bench_gpu_all.json.

Sections (one GPU), in the order they run:
  grpo_vs_trl       bench_vs_trl.py --method grpo: 76M model, 32 prompts x 8, 128 tokens, bf16 weights;
                    cptlab fast engine vs TRL default generation and TRL static cache + compiled decode
                    (goals: >= 10x default, >= 3x best)
  sdpo_vs_trl       the same for SDPO against TRL's SDPOTrainer (goals: >= 5x default, >= 2x best)
  rollout_76m       bench_rollout.py: 76M model, batch 256, 64-token prompts, 128 new tokens: fast engine
                    vs transformers.generate and its compiled static cache (goal: >= 300k tokens/s);
                    and the fast engine at batch 512
  rollout_smollm2   bench_rollout.py --model-dir SMOLLM2 at batch 64 and 256: fast engine vs
                    transformers.generate (goal: >= 15x)
  smollm2_steps     bench_step.py on SmolLM2: GRPO, 32 x 8, 128 tokens, every step's time, phases,
                    allocator retries and engine captures (goal: every step as fast as the fastest)
  profile           bench_step.py --profile on the 76M model, GRPO and SDPO: where a step's time goes
  sdpo_check        bench_vs_trl.py --check (on the CPU): cptlab's and TRL's SDPO loss on one batch, the tiny
                    random model and SmolLM2 (whose trained attention shows what TRL's positions change)
  qwen3_1p7b        bench_scale.py qwen3: the Qwen3-1.7B shape (random init, 49k vocabulary), rollout at batch 64
                    and 256 x 128 new tokens (fast, compiled, generate), each beside its bandwidth bound (weights +
                    live KV bytes per decode step at 3 TB/s; goal >= 60% of it), then GRPO steps of 32 x 8 rows
                    (rollout and training tokens/s)
  long_rollout      bench_scale.py long: heavy-tailed planted lengths up to 4,096 tokens (most rows stop early, 1% at
                    the budget), the 76M model at batch 256 and the 1.7B shape at batch 64: time against generated
                    tokens and rows x budget, KV allocated against what live tokens need
With --gpus N (a machine with N GPUs), bench_dist.py under torchrun against one process on the same machine:
  dist_grpo         76M model, 256 prompts x 8, 128 tokens: one process, ddp, fsdp (goal: >= 1.8x on two GPUs)
  dist_sdpo         the same for SDPO (EMA teacher): one process, ddp
  dist_large        a random-init 1.58B Qwen2-style model, 64 x 8, 64 tokens: one process vs fsdp (peak memory per
                    GPU falls as GPUs are added)
TRL comes from benchmarks/trl_requirements.txt (the caller installs it); without it the TRL variants
report an error and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_COMMON = ["--size", "gpu", "--device", "cuda", "--prompts", "32", "--group-size", "8", "--max-new-tokens", "128",
              "--steps", "4", "--warmup-steps", "2", "--weights-dtype", "bfloat16",
              "--variants", "cptlab:fast,trl:default,trl:static_compile,cptlab:compiled"]  # compiled last: a failed
# capture must not take the TRL figures with it
LARGE = ["model.hidden_size=2048", "model.num_layers=26", "model.num_heads=16", "model.num_kv_heads=4",
         "model.intermediate_size=8192", "method.micro_batch_size=64"]
STEP_76M = ["--size", "gpu", "--engines", "fast", "--steps", "3", "--warmup-steps", "2",
            "method.prompts_per_step=32", "rollout.group_size=8", "rollout.max_new_tokens=128"]


def smoke(commands: list[list[str]]) -> list[list[str]]:
    """--smoke: the same commands at CPU size (a check of this script's plumbing, not a measurement)."""
    swap = {"gpu": "tiny", "cuda": "cpu", "32": "2", "256": "4", "512": "8", "128": "8", "64": "8",
            "cptlab:fast,trl:default,trl:static_compile,cptlab:compiled": "cptlab:fast,trl:default",
            "plain,static,fast,compiled": "plain,static,fast", "plain,fast,compiled": "plain,fast", "fast,compiled": "fast",
            "method.prompts_per_step=32": "method.prompts_per_step=2", "rollout.group_size=8": "rollout.group_size=2",
            "rollout.max_new_tokens=128": "rollout.max_new_tokens=8", "--group-size": "--group-size", "8": "2",
            "64,256": "4,8", "4096": "64", "fast,compiled,plain": "fast,plain", "--steps=2": "--steps=1",
            "--repeats=2": "--repeats=1"}
    return [[swap.get(c, c) for c in cmd if c not in LARGE] for cmd in commands]


def sections(a) -> list[tuple[str, list[list[str]], float]]:
    """(name, commands, time cap in seconds); {out} in a command is the section's JSON path."""
    py = [sys.executable]
    if a.gpus > 1:
        dist = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.gpus), "--master_port", "29577"]
        bench = [str(HERE / "bench_dist.py"), "--size", "gpu"]
        big = ["--prompts", "256", "--group-size", "8", "--max-new-tokens", "128", "--steps", "4", "--warmup-steps", "2",
               "method.micro_batch_size=256"]  # 2048 rows in one backward do not fit one process on an H200
        out = []
        for method, strategies in (("grpo", ("ddp", "fsdp")), ("sdpo", ("ddp",))):
            args = bench + big + ["--method", method]
            out.append((f"dist_{method}", [py + args + ["--out", "{out}.one"]]
                        + [dist + args + ["--strategy", st, "--out", "{out}." + st] for st in strategies], 300))
        # a random-init Qwen2-style model of 1.58B parameters (hidden 2048, 26 layers, MLP 8192): what FSDP
        # is for, per-GPU memory (weights, gradients, AdamW state) falling as GPUs are added
        args = bench + ["--prompts", "64", "--group-size", "8", "--max-new-tokens", "64", "--steps", "3",
                        "--warmup-steps", "1", *LARGE]
        out.append(("dist_large", [py + args + ["--out", "{out}.one"],
                                   dist + args + ["--strategy", "fsdp", "--out", "{out}.fsdp"]], 300))
        return out
    out = [
        ("grpo_vs_trl", [py + [str(HERE / "bench_vs_trl.py"), "--method", "grpo", *TRL_COMMON, "--out", "{out}"]], 190),
        ("sdpo_vs_trl", [py + [str(HERE / "bench_vs_trl.py"), "--method", "sdpo", *TRL_COMMON, "--out", "{out}"]], 220),
        ("rollout_76m", [py + [str(HERE / "bench_rollout.py"), "--size", "gpu", "--batch", "256", "--prompt-len", "64",
                               "--new-tokens", "128", "--engines", "plain,static,fast,compiled", "--repeats", "3",
                               "--out", "{out}"],
                         py + [str(HERE / "bench_rollout.py"), "--size", "gpu", "--batch", "512", "--prompt-len", "64",
                               "--new-tokens", "128", "--engines", "fast,compiled", "--repeats", "3",
                               "--out", "{out}.b512"]], 130),
    ]
    if a.smollm2:
        rollout = [str(HERE / "bench_rollout.py"), "--model-dir", a.smollm2, "--prompt-len", "64", "--new-tokens", "128",
                   "--engines", "plain,fast,compiled", "--repeats", "2"]
        out += [
            ("rollout_smollm2", [py + rollout + ["--batch", "64", "--out", "{out}.b64"],
                                 py + rollout + ["--batch", "256", "--out", "{out}.b256"]], 140),
            ("smollm2_steps", [py + [str(HERE / "bench_step.py"), "--methods", "grpo", "--engines", "fast", "--steps", "8",
                                     "--warmup-steps", "1", f"model.path={a.smollm2}", "method.prompts_per_step=32",
                                     "rollout.group_size=8", "rollout.max_new_tokens=128", "--out", "{out}"]], 110),
        ]
    out.append(("profile", [py + [str(HERE / "bench_step.py"), "--methods", "grpo,sdpo", "--profile", *STEP_76M,
                                  "--out", "{out}"]], 90))
    scale = [str(HERE / "bench_scale.py")]
    out.append(("qwen3_1p7b", [py + scale + ["qwen3", "--size", "gpu", "--batches", "64,256", "--prompt-len", "64",
                                             "--new-tokens", "128", "--engines", "fast,compiled,plain", "--repeats=2",
                                             "--grpo-prompts", "32", "--group-size", "8", "--micro-batch", "32",
                                             "--steps=2", "--out", "{out}"]], 300))
    long = ["long", "--size", "gpu", "--prompt-len", "64", "--budget", "4096", "--repeats=1"]
    out.append(("long_rollout", [py + scale + long + ["--model", "76m", "--batch", "256", "--out", "{out}.76m"],
                                 py + scale + long + ["--model", "qwen3", "--batch", "64", "--out", "{out}.qwen3"]], 300))
    check = [str(HERE / "bench_vs_trl.py"), "--check", "--prompts", "4", "--group-size", "4", "--max-new-tokens", "16"]
    out.append(("sdpo_check", [py + check + ["--out", "{out}.tiny"]]
                + ([py + check + ["--model-dir", a.smollm2, "--success-every", "4", "--out", "{out}.smollm2"]]
                   if a.smollm2 else []), 120))
    return out


def run_section(name: str, commands: list[list[str]], cap: float, out_dir: Path, deadline: float) -> dict:
    log = out_dir / f"{name}.log"
    json_path = out_dir / f"{name}.json"
    status = []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        for cmd in commands:
            left = min(cap - (time.perf_counter() - t0), deadline - time.perf_counter())
            if left < 20:
                status.append("skipped: out of time")
                break
            cmd = [c.replace("{out}", str(json_path)) for c in cmd]
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left)
                status.append("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
            except subprocess.TimeoutExpired:
                status.append(f"timed out after {left:.0f} s")
    return dict(section=name, status=status, seconds=time.perf_counter() - t0, log=str(log))


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ratio(x, y):
    return x / y if x and y else None


def summarise(out_dir: Path) -> dict:
    """The figures the issue asks for, from the sections' JSON files (a part that cannot be read says
    so under its own key instead of losing the others)."""
    s: dict = {}
    for part in (_summarise_trl, _summarise_rollout, _summarise_steps, _summarise_rest, _summarise_scale):
        try:
            part(out_dir, s)
        except Exception as e:  # noqa: BLE001 - the summary of the other sections must survive
            s[f"{part.__name__}_error"] = f"{type(e).__name__}: {e}"
    return s


def _summarise_trl(out_dir: Path, s: dict) -> None:
    for method, goals in (("grpo", (10.0, 3.0)), ("sdpo", (5.0, 2.0))):
        r = _load(out_dir / f"{method}_vs_trl.json")
        if not r:
            continue
        sps = {x["variant"]: x.get("steps_per_second") for x in r["results"]}
        errors = {x["variant"]: x["error"] for x in r["results"] if "error" in x}
        trl = {k: v for k, v in sps.items() if k.startswith("trl") and v}
        ours = {k: v for k, v in sps.items() if k.startswith("cptlab") and v}
        best = max(trl, key=trl.get) if trl else None
        mine = max(ours, key=ours.get) if ours else None
        s[f"{method}_vs_trl"] = dict(
            steps_per_second=sps, errors=errors, best_cptlab=mine, best_trl=best,
            vs_default=_ratio(ours.get(mine), sps.get("trl:default")), goal_vs_default=goals[0],
            vs_best=_ratio(ours.get(mine), trl.get(best)), goal_vs_best=goals[1],
            step_seconds={x["variant"]: [round(t, 3) for t in x["step_seconds"]] for x in r["results"]
                          if "step_seconds" in x})


def _summarise_rollout(out_dir: Path, s: dict) -> None:
    r = _load(out_dir / "rollout_76m.json")
    if r:
        tps = {x["engine"]: x.get("tokens_per_second") for x in r["rows"]}
        b512 = _load(out_dir / "rollout_76m.json.b512")
        ours = max(tps.get("fast") or 0, tps.get("compiled") or 0) or None
        s["rollout_76m"] = dict(tokens_per_second=tps, goal_fast=300_000, best_cptlab=ours,
                                best_vs_plain=_ratio(ours, tps.get("plain")), best_vs_static=_ratio(ours, tps.get("static")),
                                batch_512={x["engine"]: x.get("tokens_per_second") for x in b512["rows"]} if b512 else None)
    for batch in (64, 256):
        r = _load(out_dir / f"rollout_smollm2.json.b{batch}")
        if r:
            tps = {x["engine"]: x.get("tokens_per_second") for x in r["rows"]}
            ours = max(tps.get("fast") or 0, tps.get("compiled") or 0) or None
            s[f"rollout_smollm2_b{batch}"] = dict(tokens_per_second=tps, goal_ratio=15.0,
                                                  best_vs_plain=_ratio(ours, tps.get("plain")))


def _summarise_steps(out_dir: Path, s: dict) -> None:
    r = _load(out_dir / "smollm2_steps.json")
    if r:
        steps = r[0]["steps"]
        timed = [x["seconds"] for x in steps[1:]]
        s["smollm2_steps"] = dict(step_seconds=[round(x["seconds"], 3) for x in steps],
                                  rollout_seconds=[round(x["rollout"], 3) for x in steps],
                                  alloc_retries=[x["alloc_retries"] for x in steps],
                                  engine=[x["engine"] for x in steps][-1],
                                  slowest_over_fastest=max(timed) / min(timed) if timed else None,
                                  peak_gib=r[0].get("peak_gib"))


def _summarise_rest(out_dir: Path, s: dict) -> None:
    r = _load(out_dir / "profile.json")
    if r:
        s["profile"] = {row["method"]: dict(
            steps_per_second=row["steps_per_second"], phases={k: round(v, 4) for k, v in row["profile"]["phases"].items()
                                                              if isinstance(v, float) and k != "tokens"},
            device_busy_seconds=row["profile"]["device_busy_seconds"], wall_seconds=row["profile"]["wall_seconds"],
            top_ops=row["profile"]["top_ops"][:8]) for row in r if row.get("profile")}
    for model in ("tiny", "smollm2"):
        r = _load(out_dir / f"sdpo_check.json.{model}")
        if r and r.get("check"):
            c = r["check"]
            s[f"sdpo_check_{model}"] = {k: c[k] for k in ("rows", "distilled_rows", "ratio_same_maths",
                                                          "ratio_as_each_side_runs", "ratio_positions_only")}
    for name in ("dist_grpo", "dist_sdpo", "dist_large"):
        runs = {k: _load(out_dir / f"{name}.json.{k}") for k in ("one", "ddp", "fsdp")}
        if any(runs.values()):
            s[name] = {k: dict(steps_per_second=v["steps_per_second"], world_size=v["world_size"],
                               parameters=v["parameters"], peak_gib_per_rank=v["peak_gib_per_rank"],
                               mean_reward=v.get("mean_reward"),
                               speedup=_ratio(v["steps_per_second"], (runs.get("one") or {}).get("steps_per_second")))
                       for k, v in runs.items() if v}


def _summarise_scale(out_dir: Path, s: dict) -> None:
    r = _load(out_dir / "qwen3_1p7b.json")
    if r:
        s["qwen3_1p7b"] = dict(
            parameters=r["parameters"], device=r["device"], goal_fraction_of_bound=0.6, new_tokens=r["args"]["new_tokens"],
            rollout=[{k: x.get(k) for k in ("batch", "engine", "tokens_per_second", "fraction_of_bound", "error")}
                     | ({"bound_tokens_per_second": x["bound"]["bound_tokens_per_second"],
                         "bytes_per_step": x["bound"]["mean_bytes_per_step"], "weight_bytes": x["bound"]["weight_bytes"],
                         "kv_bytes_per_token": x["bound"]["kv_bytes_per_token"]} if "bound" in x else {})
                     for x in r["rollout"]],
            grpo={k: (r["grpo"] or {}).get(k) for k in ("rows", "seconds_per_step", "rollout_tokens_per_second",
                                                         "train_tokens_per_second", "peak_gib")} if r.get("grpo") else None)
    for model in ("76m", "qwen3"):
        r = _load(out_dir / f"long_rollout.json.{model}")
        if r:
            s[f"long_rollout_{model}"] = {k: r.get(k) for k in (
                "parameters", "rows", "budget", "seconds", "generated_tokens", "rows_x_budget", "generated_fraction",
                "rows_at_budget", "generated_tokens_per_second", "slot_tokens_per_second", "kv_allocated_bytes",
                "kv_live_max_bytes")}


def print_summary(s: dict, runs: list[dict]) -> None:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    print("\n================ summary (bench_gpu_all) ================")
    for r in runs:
        print(f"  {r['section']:16s} {', '.join(r['status']) or '-':30s} {r['seconds']:6.0f} s   {r['log']}")
    for method in ("grpo", "sdpo"):
        x = s.get(f"{method}_vs_trl")
        if x:
            sps = " ".join(f"{k}={f(v, '.3f')}" for k, v in x["steps_per_second"].items())
            print(f"{method.upper()} step/s: {sps}")
            print(f"  best cptlab ({x['best_cptlab']}) / TRL default {f(x['vs_default'])}x (goal >= "
                  f"{x['goal_vs_default']}x); / best TRL ({x['best_trl']}) {f(x['vs_best'])}x (goal >= {x['goal_vs_best']}x)")
            print(f"  seconds per step (warm-up first): {x['step_seconds']}")
            for k, e in x["errors"].items():
                print(f"  {k} failed: {e[:160]}")
    x = s.get("rollout_76m")
    if x:
        tps = " ".join(f"{k}={f(v, ',.0f')}" for k, v in x["tokens_per_second"].items())
        b512 = " ".join(f"{k}={f(v, ',.0f')}" for k, v in (x["batch_512"] or {}).items())
        print(f"rollout 76M, batch 256 (tok/s): {tps}; best cptlab {f(x['best_cptlab'], ',.0f')} (goal >= 300,000), "
              f"/plain {f(x['best_vs_plain'])}x, /static {f(x['best_vs_static'])}x; batch 512: {b512 or '-'}")
    for batch in (64, 256):
        x = s.get(f"rollout_smollm2_b{batch}")
        if x:
            tps = " ".join(f"{k}={f(v, ',.0f')}" for k, v in x["tokens_per_second"].items())
            print(f"rollout SmolLM2, batch {batch} (tok/s): {tps}; best cptlab / plain {f(x['best_vs_plain'])}x "
                  f"(goal >= 15x)")
    x = s.get("smollm2_steps")
    if x:
        print(f"SmolLM2 GRPO 32x8x128, seconds per step (first: warm-up): {x['step_seconds']}")
        print(f"  rollout s {x['rollout_seconds']}; allocator retries {x['alloc_retries']}; engine {x['engine']}; "
              f"slowest/fastest timed step {f(x['slowest_over_fastest'])}; peak GiB {f(x['peak_gib'])}")
    for method, x in (s.get("profile") or {}).items():
        busy = x["device_busy_seconds"]
        print(f"profile {method} (76M, 32x8x128): {f(x['steps_per_second'], '.2f')} steps/s; one step {f(x['wall_seconds'], '.3f')} s, "
              f"device busy {f(busy, '.3f')} s; phases {x['phases']}")
        print("  top device ops: " + "; ".join(f"{o['name'][:40]} {o['seconds']:.4f}s" for o in x["top_ops"]))
    for model in ("tiny", "smollm2"):
        x = s.get(f"sdpo_check_{model}")
        if x:
            print(f"SDPO loss check ({model}, CPU, {x['rows']} rows, {x['distilled_rows']} distilled): same maths "
                  f"loss {f(x['ratio_same_maths']['loss'], '.6f')} grad {f(x['ratio_same_maths']['grad_norm'], '.6f')}; "
                  f"as each side runs {f(x['ratio_as_each_side_runs']['loss'], '.4f')}; TRL positions "
                  f"{f(x['ratio_positions_only']['loss'], '.4f')}")
    x = s.get("qwen3_1p7b")
    if x:
        print(f"Qwen3-1.7B shape ({x['parameters'] / 1e9:.2f}B, random init), rollout x {x['new_tokens']} new tokens "
              "(goal >= 60% of the bandwidth bound: weights + live KV bytes per decode step at 3 TB/s):")
        for r in x["rollout"]:
            if r.get("error"):
                print(f"  b{r['batch']} {r['engine']}: error {r['error'][:120]}")
            else:
                print(f"  b{r['batch']} {r['engine']}: {f(r['tokens_per_second'], ',.0f')} tok/s = "
                      f"{f(r['fraction_of_bound'], '.0%')} of {f(r['bound_tokens_per_second'], ',.0f')} (per step "
                      f"{r['bytes_per_step'] / 1e9:.2f} GB: weights {r['weight_bytes'] / 1e9:.2f} GB + KV "
                      f"{r['kv_bytes_per_token'] / 1024:.0f} KiB/token)")
        g = x.get("grpo")
        if g:
            print(f"  GRPO {g['rows']} rows: {f(g['seconds_per_step'], '.3f')} s/step, rollout "
                  f"{f(g['rollout_tokens_per_second'], ',.0f')} tok/s, training {f(g['train_tokens_per_second'], ',.0f')} "
                  f"tok/s, peak GiB {f(g['peak_gib'], '.1f')}")
    for model in ("76m", "qwen3"):
        x = s.get(f"long_rollout_{model}")
        if x:
            print(f"long rollout {model} ({x['rows']} rows, budget {x['budget']}, {x['rows_at_budget']} at it): "
                  f"{f(x['seconds'])} s; generated {x['generated_tokens']:,} = {f(x['generated_fraction'], '.1%')} of "
                  f"rows x budget {x['rows_x_budget']:,}; {f(x['generated_tokens_per_second'], ',.0f')} generated tok/s, "
                  f"{f(x['slot_tokens_per_second'], ',.0f')} slot tok/s; KV allocated "
                  f"{x['kv_allocated_bytes'] / 1e9:.2f} GB, live at most {x['kv_live_max_bytes'] / 1e9:.2f} GB")
    for name in ("dist_grpo", "dist_sdpo", "dist_large"):
        x = s.get(name)
        if x:
            print(f"{name}: " + "; ".join(
                f"{k} (x{v['world_size']}, {v['parameters'] / 1e6:.0f}M) {f(v['steps_per_second'], '.3f')} steps/s "
                f"({f(v['speedup'])}x one), peak GiB per rank {[round(g, 1) for g in v['peak_gib_per_rank'] if g]}"
                for k, v in x.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct as a local HF directory (safetensors)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run")
    p.add_argument("--sections", default="all", help="comma list of section names (default: all)")
    p.add_argument("--gpus", type=int, default=1, help="N > 1: the several-GPU sections (torchrun ddp and fsdp against one process) instead")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks this script, measures nothing")
    a = p.parse_args()
    deadline = time.perf_counter() + a.budget
    out_dir = Path(a.out_dir or os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = sections(a)
    if a.sections != "all":
        wanted = a.sections.split(",")
        todo = [t for t in todo if t[0] in wanted]
    if a.smoke:
        todo = [(name, smoke(commands), cap) for name, commands, cap in todo]
    runs = []
    for name, commands, cap in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        runs.append(run_section(name, commands, cap, out_dir, deadline))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {', '.join(runs[-1]['status'])} ({runs[-1]['seconds']:.0f} s)",
              flush=True)
    summary = summarise(out_dir)
    (out_dir / "bench_gpu_all.json").write_text(json.dumps(dict(runs=runs, summary=summary), indent=1))
    try:
        print_summary(summary, runs)
    except Exception as e:  # noqa: BLE001 - the JSON is written; say what the printing tripped on
        print(f"summary printing failed ({type(e).__name__}: {e}); the figures are in {out_dir / 'bench_gpu_all.json'}")
        print(json.dumps(summary, indent=1)[-6000:])
    for key, error in summary.items():
        if key.endswith("_error"):
            print(f"{key}: {error}")


if __name__ == "__main__":
    main()
