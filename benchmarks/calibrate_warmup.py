"""Calibrate the warm-up: build the tiny model, run warm-up SFT, print greedy accuracy per domain.

    python benchmarks/calibrate_warmup.py [PRESET] [key.sub=value ...]

The issue's target: every warm-up (prior) domain between 30% and 90% greedy accuracy, so that a stage
has room both to learn and to forget. Prints one table and one JSON line (for sweeps).
"""

import json
import sys
import time

import torch

from cptlab.config import load_config, resolve_eval
from cptlab.evaluate import evaluate_all
from cptlab.tasks import install_domains
from cptlab.rollout import SamplingSpec
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, resolve_device
from cptlab.warmup import run_warmup


def main(argv: list[str]) -> None:
    preset = argv[0] if argv and "=" not in argv[0] else "tiny"
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(preset, overrides)
    install_domains(cfg.domains)  # this process evaluates the config's domains
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    tokenizer = build_tokenizer()
    model = build_tiny_model(cfg.model, tokenizer, seed=cfg.run.seed).to(device)
    t0 = time.perf_counter()
    losses = run_warmup(model, tokenizer, cfg, device, cfg.run.seed)
    warmup_s = time.perf_counter() - t0
    cfg.eval.num_samples = 0
    domains = cfg.warmup.domains + [f"{d}_ood" for d in cfg.warmup.domains]
    t0 = time.perf_counter()
    ecfg = resolve_eval(cfg)
    results = evaluate_all(model, tokenizer, domains, ecfg, cfg.prompt, SamplingSpec.for_eval(ecfg, cfg.rollout))
    eval_s = time.perf_counter() - t0
    acc = {name: r.greedy_acc for name, r in results.items()}
    prior = [acc[d] for d in cfg.warmup.domains]
    print(f"device {device}, {count_parameters(model) / 1e6:.2f}M parameters, warm-up {cfg.warmup.steps} steps "
          f"in {warmup_s:.0f}s, final loss {sum(losses[-20:]) / 20:.3f}, eval {eval_s:.0f}s")
    for name, a in acc.items():
        flag = "" if name.endswith("_ood") or 0.3 <= a <= 0.9 else "  <- outside 30-90%"
        print(f"  {name:16s} {a:6.1%}{flag}")
    print("calibrated" if all(0.3 <= a <= 0.9 for a in prior) else "NOT calibrated")
    print(json.dumps({"overrides": overrides, "warmup_seconds": warmup_s, "accuracy": acc}))


if __name__ == "__main__":
    main(sys.argv[1:])
