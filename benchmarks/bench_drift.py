"""Cost of one stage-end drift record: the parameter-drift spectra (cptlab's float64 Gram route against
one SVD per matrix, the reference), the "Path Not Taken" weight geometry (principal_drift), the weight
snapshot and the response-drift probes.

    python benchmarks/bench_drift.py [--size gpu|tiny] [--device cpu|cuda] [--probes 8] [--no-response]
                                     [--out FILE.json]

The model is random-init and then perturbed (1e-3 of each tensor's mean magnitude), standing in for a
trained model. Not a test: figures only, plus the largest difference between the two routes' numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cptlab.analysis import drift as D
from cptlab.analysis.response import response_drift
from cptlab.config import eval_domains, load_config, resolve_eval
from cptlab.drift_probe import snapshot
from cptlab.variants import base_reference
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, set_compute_dtype
from cptlab.prompts import student_prompt
from cptlab.rollout import SamplingSpec
from cptlab.tasks import make_split


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def svd_reference(base: dict, current: dict, names: list[str], device) -> tuple[float, float]:
    """Mean effective rank and subspace overlap from full SVDs (what parameter_drift computed before)."""
    ranks, overlaps = [], []
    for n in names:
        delta = (current[n] - base[n]).to(device)
        ranks.append(D.effective_rank(delta))
        overlaps.append(D.subspace_overlap(delta, base[n].to(device)))
    return sum(ranks) / len(ranks), sum(overlaps) / len(overlaps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--probes", type=int, default=8, help="probe prompts per domain (eval.probe_per_domain)")
    p.add_argument("--no-response", action="store_true", help="skip the response-drift probes")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = load_config("gpu_continual" if a.size == "gpu" else "tiny", [])
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0).to(device)
    set_compute_dtype(model, cfg.model.compute_dtype)
    base_model = base_reference(model)
    base = snapshot(model)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=g, device=device) * 1e-3 * prm.abs().mean())
    current, t_snap = timed(device, lambda: snapshot(model))
    names = [n for n in D._untied_names(base, current)
             if current[n].dim() == 2 and D.module_kind(n) != "embedding" and min(current[n].shape) > 1]
    cache: dict = {}
    cold, t_cold = timed(device, lambda: D.parameter_drift(base, current, base, device=device, base_subspaces=cache))
    _, t_warm = timed(device, lambda: D.parameter_drift(base, current, base, device=device, base_subspaces=cache))
    geometry: dict = {}
    _, t_geo_cold = timed(device, lambda: D.principal_drift(base, current, device=device, cache=geometry))
    geo, t_geo_warm = timed(device, lambda: D.principal_drift(base, current, device=device, cache=geometry))
    (ref_rank, ref_overlap), t_svd = timed(device, lambda: svd_reference(base, current, names, device))
    probes = [student_prompt(cfg.prompt, ex.question, tok) for d in eval_domains(cfg)
              for ex in make_split(d, "eval", a.probes, style=cfg.prompt.style, answer_format=cfg.prompt.answer_format)]
    spec = SamplingSpec.for_eval(resolve_eval(cfg), cfg.rollout)
    t_resp = float("nan")
    if not a.no_response:
        timed(device, lambda: response_drift(model, base_model, tok, probes, spec, seed=0))  # engine build, graph capture
        _, t_resp = timed(device, lambda: response_drift(model, base_model, tok, probes, spec, seed=0))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "parameters": count_parameters(model), "matrices": len(names),
        "snapshot_s": t_snap, "parameter_drift_first_s": t_cold, "parameter_drift_later_s": t_warm,
        "principal_drift_first_s": t_geo_cold, "principal_drift_later_s": t_geo_warm, "svd_reference_s": t_svd,
        "response_drift_s": t_resp, "probes": len(probes),
        "effective_rank": [cold["effective_rank"], ref_rank], "subspace_overlap": [cold["subspace_overlap"], ref_overlap],
    }
    print(f"model {result['parameters'] / 1e6:.1f}M parameters, {len(names)} matrices, {result['device']}, "
          f"{result['threads']} threads")
    print(f"snapshot                        {t_snap:7.2f} s")
    print(f"parameter_drift, first record   {t_cold:7.2f} s  (base subspaces computed)")
    print(f"parameter_drift, later records  {t_warm:7.2f} s  (base subspaces cached)")
    print(f"principal_drift, first record   {t_geo_cold:7.2f} s  (base spectra and masks computed)")
    print(f"principal_drift, later records  {t_geo_warm:7.2f} s  -> parameter drift record "
          f"{t_warm:.2f} s -> {t_warm + t_geo_warm:.2f} s")
    print(f"SVD reference (rank + overlap)  {t_svd:7.2f} s  -> Gram route {t_svd / t_warm:.1f}x faster per record")
    print(f"response_drift, {len(probes)} probes       {t_resp:7.2f} s")
    print(f"effective rank  Gram {cold['effective_rank']:.3f}  SVD {ref_rank:.3f}")
    print(f"subspace overlap Gram {cold['subspace_overlap']:.5f}  SVD {ref_overlap:.5f}")
    print("geometry: " + ", ".join(f"{k} {geo[k]:.4g}" for k in D.GEOMETRY_METRICS))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
