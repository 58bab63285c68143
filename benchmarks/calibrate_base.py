"""Calibrate a base model on candidate domains: which can it learn, and does it follow the answer format?

    python benchmarks/calibrate_base.py [PRESET|FILE.yaml] [key=value ...] --model DIR
        [--domains-file benchmarks/smollm2_candidates.yaml] [--domains a,b] [--n 256]
        [--variants boxed,boxed_example] [--max-new-tokens 256] [--device cuda] [--out calibration.json]

For every domain and prompt variant: greedy accuracy (strict: the right answer in the right wrapper),
lenient accuracy (the right value written anyhow, tasks/answer.py), format rate and mean length on the
first N held-out prompts, from one batched generate call through the run's rollout engine. Prompts are
reasoning-gym's own questions (prompt.style=full) in the tokenizer's chat template. Prints a table and
writes JSON (with a few completions per cell to read). Candidates come from the `domains` section of a
YAML file and/or built-in domain names; `distinct` is the number of different questions among the N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from cptlab.config import (Config, apply_overrides, deep_merge, eval_domains, from_dict, load_source, resolve_eval,
                           validate)
from cptlab.basemodel import base_model
from cptlab.tasks import install_domains
from cptlab.evaluate import evaluate_domain
from cptlab.models import count_parameters, resolve_device
from cptlab.rollout import SamplingSpec
from cptlab.store import atomic_write_json

# reasoning-gym's question and the format's instruction as the user's message, nothing around it
COMMON = ["prompt.style=full", "prompt.use_chat_template=true", "prompt.question_template='{question}'",
          "prompt.answer_prefix=", "eval.num_samples=0", "eval.drift=false"]
VARIANTS = {
    "boxed": ["prompt.answer_format=boxed", "prompt.format_example=false"],
    "boxed_example": ["prompt.answer_format=boxed", "prompt.format_example=true"],
    "tags": ["prompt.answer_format=tags", "prompt.format_example=false"],
    "tags_example": ["prompt.answer_format=tags", "prompt.format_example=true"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="*", help="[PRESET|FILE.yaml] [key.sub=value ...] (default preset: tiny)")
    p.add_argument("--model", help="model.path: a local HF directory (anything model.path accepts)")
    p.add_argument("--domains-file", help="YAML file whose `domains:` section defines candidate domains")
    p.add_argument("--domains", help="comma-separated domains (default: every domain of --domains-file, "
                                     "else the config's evaluation domains)")
    p.add_argument("--n", type=int, default=256, help="held-out prompts per domain (at most 512)")
    p.add_argument("--variants", default="boxed,boxed_example", help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--samples", type=int, default=3, help="completions per cell kept in the JSON")
    p.add_argument("--out", default="calibration.json")
    return p.parse_args(argv)


def build_config(a: argparse.Namespace, file_domains: dict, extra: list[str]) -> Config:
    preset = a.source[0] if a.source and "=" not in a.source[0] else None
    overrides = [x for x in a.source if "=" in x]
    data = load_source(preset)
    if file_domains:
        data = deep_merge(data, {"domains": file_domains})
    settings = [*COMMON, f"eval.num_prompts={a.n}", f"eval.max_new_tokens={a.max_new_tokens}",
                f"rollout.batch_size={a.batch_size}", f"run.device={a.device}",
                *([f"model.path={a.model}"] if a.model else []), *overrides, *extra]
    cfg = from_dict(Config, apply_overrides(data, settings))
    validate(cfg)
    install_domains(cfg.domains)  # this process evaluates and warms up on the config's domains
    return cfg


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    file_domains = {}
    if a.domains_file:
        file_domains = (yaml.safe_load(Path(a.domains_file).read_text()) or {}).get("domains") or {}
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}: expected some of {', '.join(VARIANTS)}")
    cfg = build_config(a, file_domains, [])
    domains = ([d.strip() for d in a.domains.split(",") if d.strip()] if a.domains
               else list(file_domains) or eval_domains(cfg))
    device = resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    model, tokenizer, info = base_model(cfg, device)
    print(f"model {cfg.model.path or 'tiny (built)'}: {count_parameters(model) / 1e6:.1f}M parameters on {device}, "
          f"loaded in {time.perf_counter() - t0:.1f}s; {len(domains)} domains x {len(variants)} variants, "
          f"n={a.n}, {a.max_new_tokens} new tokens, greedy", flush=True)
    cells, started = [], time.perf_counter()
    for variant in variants:
        vcfg = build_config(a, file_domains, VARIANTS[variant])
        for domain in domains:
            t = time.perf_counter()
            ecfg = resolve_eval(vcfg)
            r = evaluate_domain(model, tokenizer, domain, ecfg, vcfg.prompt, SamplingSpec.for_eval(ecfg, vcfg.rollout))
            seconds = time.perf_counter() - t
            cell = dict(domain=domain, variant=variant, **r.metrics(), seconds=seconds,
                        distinct=len({row["question"] for row in r.rows}),
                        samples=[{k: row[k] for k in ("question", "completion", "answer", "lenient_answer", "correct",
                                                      "lenient_correct", "well_formed")} for row in r.rows[:a.samples]])
            cells.append(cell)
            print(f"  {variant:14s} {domain:18s} acc {r.greedy_acc:6.1%}  lenient {r.lenient_acc:6.1%}  "
                  f"format {r.format_rate:6.1%}  len {r.mean_length:5.1f}  n {cell['num_prompts']:3d} "
                  f"(distinct {cell['distinct']:3d})  {seconds:5.1f}s", flush=True)
    total = time.perf_counter() - started
    print_table(cells, domains, variants)
    print(f"{len(cells)} cells in {total:.0f}s on {device}")
    atomic_write_json(Path(a.out), dict(model=cfg.model.path, base=info, device=str(device), n=a.n,
                                        max_new_tokens=a.max_new_tokens, variants={v: VARIANTS[v] for v in variants},
                                        common=COMMON, domains={d: file_domains.get(d) for d in domains},
                                        seconds=total, cells=cells))
    print(f"written {a.out}")


def print_table(cells: list[dict], domains: list[str], variants: list[str]) -> None:
    """One row per domain; per variant: strict / lenient / format, in percent. '*' marks a strict
    accuracy inside the 10-70% band that a stage domain should start in."""
    by = {(c["domain"], c["variant"]): c for c in cells}
    head = f"{'domain':18s} {'n':>4s} " + " ".join(f"{v + ' acc/len/fmt':>24s}" for v in variants)
    print("\n" + head + "\n" + "-" * len(head))
    for d in domains:
        parts = []
        for v in variants:
            c = by[(d, v)]
            band = "*" if 0.10 <= c["greedy_acc"] <= 0.70 else " "
            parts.append(f"{100 * c['greedy_acc']:5.1f}{band}/{100 * c['lenient_acc']:5.1f}/{100 * c['format_rate']:5.1f}")
        print(f"{d:18s} {by[(d, variants[0])]['num_prompts']:4d} " + " ".join(f"{p:>24s}" for p in parts))


if __name__ == "__main__":
    main(sys.argv[1:])
