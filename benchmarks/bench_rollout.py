"""Rollout throughput: generated tokens/s of the plain path (`transformers.generate`, dynamic cache),
transformers' static cache (compiled decode step), and cptlab's fast engine (eager kernels, or "compiled": its
decode layer compiled by torch.compile, rollout.compile_decode), on one model and prompts.

    python benchmarks/bench_rollout.py [--size gpu|tiny | --model-dir DIR] [--batch 256] [--prompt-len 64]
                                       [--new-tokens 128] [--engines plain,static,fast] [--repeats 3]
                                       [--out FILE.json]

The model is random-init (the tokens do not matter for speed), or a local HF directory (--model-dir,
e.g. SmolLM2-135M-Instruct); prompts are random token ids; EOS is disabled so that every row
generates exactly --new-tokens tokens in every engine. The HF paths run on a bfloat16 copy of the
weights on CUDA (their fastest setting); the fast engine samples from its own bfloat16 copy.
Prints tokens/s per engine and the fast engine's ratio to each other one. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from cptlab.config import load_config
from cptlab.engine import engine_for
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, resolve_device


def model_for(a, device):
    """(model, vocabulary size to draw prompt ids from)."""
    if a.model_dir:
        from cptlab.config import ModelConfig
        from cptlab.models import load_model

        model, tok = load_model(a.model_dir, ModelConfig(), device)
        return model.eval(), len(tok)
    tok = build_tokenizer()
    cfg = load_config("gpu_model" if a.size == "gpu" else "tiny").model
    return build_tiny_model(cfg, tok, seed=0).to(device).eval(), len(tok)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, ids, mask, new_tokens: int, static: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0, temperature=1.0,
                  eos_token_id=None, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]


def time_engine(name: str, model, ids, mask, new_tokens: int, repeats: int, device) -> dict:
    if name in ("fast", "compiled"):
        eng = engine_for(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
                         cuda_graphs=True, compile=name == "compiled")
        run = lambda: eng.generate(model, ids, mask, max_new_tokens=new_tokens, stop_ids=(), pad_id=0)  # noqa: E731
    else:
        hf_model = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
        run = lambda: hf_generate(hf_model, ids, mask, new_tokens, static=name == "static")  # noqa: E731
    t0 = time.perf_counter()
    with torch.no_grad():
        out = run()  # warm-up: graph capture / compilation happen here
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    assert out.shape == (ids.shape[0], new_tokens), out.shape
    best = sorted(times)[len(times) // 2]
    extra = {"engine_counts": dict(eng.counts)} if name in ("fast", "compiled") else {}  # captures: one per shape and mode
    return dict(engine=name, tokens_per_second=ids.shape[0] * new_tokens / best, seconds=best, warmup_seconds=warmup_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--model-dir", default=None, help="a local HF model directory instead of a random-init model")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--engines", default="plain,static,fast")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = resolve_device(a.device)
    model, vocab = model_for(a, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, model.config.vocab_size), (a.batch, a.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    rows = []
    for e in a.engines.split(","):
        try:
            rows.append(time_engine(e, model, ids, mask, a.new_tokens, a.repeats, device))
        except Exception as err:  # e.g. transformers' compiled static cache on an odd setup: keep the others
            rows.append(dict(engine=e, error=f"{type(err).__name__}: {str(err)[:300]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model: {a.model_dir or a.size} ({count_parameters(model) / 1e6:.1f}M parameters) on {name}; batch "
          f"{a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, median of {a.repeats}")
    print(f"{'engine':8s} {'tokens/s':>12s} {'seconds':>8s} {'warm-up s':>9s} {'peak GiB':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:8s} error: {r['error']}")
            continue
        peak = f"{r['peak_gib']:8.2f}" if r["peak_gib"] is not None else f"{'-':>8s}"
        print(f"{r['engine']:8s} {r['tokens_per_second']:12,.0f} {r['seconds']:8.3f} {r['warmup_seconds']:9.1f} {peak}")
    fast = next((r for r in rows if r["engine"] == "fast" and "error" not in r), None)  # ratios against eager fast
    for r in rows:
        if fast is not None and r is not fast and "error" not in r:
            print(f"fast / {r['engine']}: {fast['tokens_per_second'] / r['tokens_per_second']:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(args=vars(a), device=name, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
