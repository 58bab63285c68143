"""Seconds per parameter-drift record at the study's model size: the previous path (per matrix, float64
Gram eigendecompositions, one CPU thread for the CPU work; tests/drift_reference.py) against the batched
one (analysis/drift_record.weight_drift), on random matrices of Qwen3-4B's shapes.

    python benchmarks/drift_scale.py [--smoke] [--device cuda|cpu] [--layers 36] [--old-layers N]
                                     [--lora RANK] [--vocab 151936] [--shrink 1] [--skip-old] [--out FILE.json]

Qwen3-4B: 36 layers, hidden 2560, intermediate 9728, 32 query heads and 8 KV heads of 128 (q_proj
[4096, 2560], k/v_proj [1024, 2560], o_proj [2560, 4096], gate/up_proj [9728, 2560], down_proj
[2560, 9728]), q/k norms of 128, tied embeddings [vocab, 2560]. The current weights are the base moved
by 1e-3 of each tensor's mean magnitude (a full fine-tune: every entry moves), or with --lora R the
base plus a rank-R update on q/k/v/o/gate/up/down (the new path reads the factors, the old one the
merged float32 weights, as the driver gives them today). Each path computes a first record (the base's
spectra computed: the stage-0 case has current == base, timed separately) and a later one (cached).

--smoke: one layer and a 4096-token vocabulary, on the CPU unless --device says otherwise: checks that
the script runs (figures from a shared CPU are not results; one layer of these shapes took over 20
minutes for both paths on a shared 2-core CPU); --shrink K divides every width by K (a quick check of the
script itself). --old-layers N times the old path on the first N layers only and scales its seconds by
layers / N (printed as extrapolated); the old path on all 36 layers of a GPU takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import drift_reference as OLD  # noqa: E402  the previous implementation, kept as the tests' reference

from cptlab.analysis.drift_record import weight_drift  # noqa: E402
from cptlab.analysis.spectra import BaseSpectra, LowRank  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2560, 9728, 32, 8, 128
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_shapes(i: int, shrink: int = 1) -> dict[str, tuple[int, ...]]:
    HIDDEN, INTERMEDIATE, HEAD_DIM = (x // shrink for x in (globals()["HIDDEN"], globals()["INTERMEDIATE"],
                                                            globals()["HEAD_DIM"]))
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}


def qwen3_4b_state(layers: int, vocab: int, gen: torch.Generator, shrink: int = 1) -> dict[str, torch.Tensor]:
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN // shrink), "model.norm.weight": (HIDDEN // shrink,)}
    for i in range(layers):
        shapes.update(layer_shapes(i, shrink))
    state = {}
    for name, shape in shapes.items():
        state[name] = (torch.ones(shape) if len(shape) == 1
                       else torch.randn(shape, generator=gen) / shape[1] ** 0.5)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as in Qwen3-4B
    return state


def moved(base: dict[str, torch.Tensor], gen: torch.Generator, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in base.items():
        if name == "lm_head.weight":
            continue
        out[name] = t + scale * t.abs().mean() * torch.randn(t.shape, generator=gen)
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def lora_updates(base: dict[str, torch.Tensor], rank: int, gen: torch.Generator) -> dict[str, LowRank]:
    out = {}
    for name, t in base.items():
        if any(f".{key}." in name for key in ADAPTED):
            b = 1e-2 * torch.randn(t.shape[0], rank, generator=gen)
            out[name] = LowRank(b, torch.randn(rank, t.shape[1], generator=gen) / t.shape[1] ** 0.5)
    return out


def timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def old_record(base, current, previous, device, caches):
    out = OLD.parameter_drift(base, current, previous, device=device, base_subspaces=caches[0])
    out.update(OLD.principal_drift(base, current, device=device, cache=caches[1]))
    return out


def largest_difference(new: dict, old: dict) -> tuple[str, float]:
    worst = ("", 0.0)
    for key, value in old.items():
        if key not in new or value != value or new[key] != new[key]:
            continue
        diff = abs(new[key] - value) if key.startswith("max_angle") else abs(new[key] - value) / max(abs(value), 1e-12)
        worst = max(worst, (key, diff), key=lambda kv: kv[1])
    return worst


def subset(state: dict, layers: int) -> dict:
    keep = {f"model.layers.{i}." for i in range(layers)}
    return {k: v for k, v in state.items() if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="one layer, 4096-token vocabulary, CPU by default")
    p.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 36; 1 with --smoke)")
    p.add_argument("--old-layers", type=int, default=None, help="time the old path on this many layers, scaled")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 151936; 4096 with --smoke)")
    p.add_argument("--lora", type=int, default=0, help="rank of LoRA updates on the 7 linear kinds (0: full)")
    p.add_argument("--shrink", type=int, default=1, help="divide every width by this (a quick check)")
    p.add_argument("--skip-old", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu"))
    layers = a.layers or (1 if a.smoke else 36)
    vocab = a.vocab or (4096 if a.smoke else 151936)
    old_layers = min(a.old_layers or layers, layers)
    gen = torch.Generator().manual_seed(0)
    base = qwen3_4b_state(layers, vocab, gen, a.shrink)
    if a.lora:
        updates = lora_updates(base, a.lora, gen)
        current = {**base, **updates}
        prev_updates = {n: LowRank(0.5 * u.b, u.a) for n, u in updates.items()}
        previous = {**base, **prev_updates}
        dense = {**base, **{n: base[n] + u.dense() for n, u in updates.items()}}
        dense_prev = {**base, **{n: base[n] + u.dense() for n, u in prev_updates.items()}}
    else:
        current, previous = moved(base, gen), moved(base, gen, 5e-4)
        dense, dense_prev = current, previous
    params = sum(t.numel() for n, t in base.items() if n != "lm_head.weight")
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    shrunk = f" / {a.shrink}" if a.shrink > 1 else ""
    print(f"Qwen3-4B shapes{shrunk}: {layers} layers, vocabulary {vocab}, {params / 1e9:.2f}B parameters, "
          f"{'LoRA rank ' + str(a.lora) if a.lora else 'full update'}, {device_name}")

    cache = BaseSpectra()
    _, new_stage0 = timed(device, lambda: weight_drift(base, base, None, device=device, cache=cache))
    _, new_first = timed(device, lambda: weight_drift(base, current, previous, device=device, cache=BaseSpectra()))
    new, new_later = timed(device, lambda: weight_drift(base, current, previous, device=device, cache=cache))
    result = {"device": device_name, "layers": layers, "vocab": vocab, "parameters": params, "lora": a.lora,
              "new_stage0_s": new_stage0, "new_first_s": new_first, "new_later_s": new_later}
    print(f"new  stage-0 record (base spectra computed) {new_stage0:8.2f} s")
    print(f"new  first moved record (base computed)     {new_first:8.2f} s")
    print(f"new  later record (base cached)             {new_later:8.2f} s")
    if not a.skip_old:
        scale = layers / old_layers
        ob, oc, op = (subset(s, old_layers) for s in (base, dense, dense_prev))
        caches = ({}, {})
        _, old_stage0 = timed(device, lambda: old_record(ob, ob, None, device, caches))
        old, old_later = timed(device, lambda: old_record(ob, oc, op, device, caches))
        note = f" (extrapolated from {old_layers} layers)" if old_layers < layers else ""
        result.update(old_stage0_s=old_stage0 * scale, old_later_s=old_later * scale, old_layers=old_layers)
        print(f"old  stage-0 record{note:>24} {old_stage0 * scale:8.2f} s  -> {old_stage0 * scale / new_stage0:5.1f}x")
        print(f"old  later record{note:>26} {old_later * scale:8.2f} s  -> {old_later * scale / new_later:5.1f}x")
        if old_layers == layers:
            key, diff = largest_difference(new, old)
            result["largest_difference"] = [key, diff]
            print(f"largest difference new vs old: {key} {diff:.2e} (relative; degrees for max_angle)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
