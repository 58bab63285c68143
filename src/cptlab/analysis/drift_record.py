"""One parameter-drift record over a whole model, batched: the numbers of drift.parameter_drift and
drift.principal_drift (their definitions live in drift.py) computed in one pass over the weights.

How it scales to billions of parameters:
  - every matrix is moved to the compute device once per record (`device`: the model's GPU when there),
    in batches of same-shaped matrices (36 q_proj of a Qwen3-4B in a few batches, not 36 calls);
  - the spectra are batched float64 Gram eigendecompositions (spectra.gram_spectra; why float64 there);
    the entry-wise numbers stay in float32 with float64 sums;
  - the base's spectra, top singular vectors, principal-mask cut and norm are computed once per run and
    kept in a `BaseSpectra` cache (save/load it in the run directory so that a resumed run does not
    recompute them);
  - a weight equal to its base (the stage-0 record, every frozen weight of a LoRA run) costs no
    eigendecomposition: its spectra are the cached base's;
  - a `LowRank` entry of `current` / `previous` (a LoRA update b @ a over the base weight, see
    lora.lowrank_updates) gives the update's norms and spectrum from its factors (r x r Grams, the QR of
    the factors); only the entry-wise numbers (sparsity, update share) and W_t's own spectrum (spectral
    shift, angle, mask) form b @ a, one batch at a time on the device.
The CPU path pins torch to one thread (bitwise the same numbers at any thread count, drift.fixed_threads).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .drift import (
    GEOMETRY_METRICS, KINDS, MASK_DENSITY, _mean, _numerical_rank, _overlap, _rank_from_singular_values,
    _untied_names, fixed_threads, geometry_ranks, max_principal_angle, module_kind, spectral_shift,
)
from .spectra import (BaseSpectra, LowRank, gram_spectra, lowrank_frobenius_sq, lowrank_spectrum, pack_masks,
                      principal_reconstruction, project64, top_thresholds, unpack_masks)

BATCH_BYTES = 512 * 2 ** 20
"""Size of one batch of same-shaped matrices, counted as float64 (bytes); the device holds a few times
this while a batch is worked on."""

F32_EPS = torch.finfo(torch.float32).eps


def _sq(x: Tensor) -> Tensor:
    """Per item of a batch, the sum of squares in float64: [B, ...] -> [B]."""
    return x.pow(2).flatten(1).sum(1, dtype=torch.float64)


def _stack(tensors: list[Tensor], device, dtype) -> Tensor:
    """The tensors as one [B, ...] batch on `device`, each copied straight there (no host staging)."""
    out = torch.empty((len(tensors), *tensors[0].shape), device=device, dtype=dtype)
    for i, t in enumerate(tensors):
        out[i].copy_(t.detach())
    return out


def _dtype(t) -> torch.dtype:
    return torch.float64 if not isinstance(t, LowRank) and t.dtype == torch.float64 else torch.float32


def _form(entry) -> tuple[str, int]:
    """How an entry is held: ('dense', 0), or ('lowrank', r)."""
    return ("lowrank", entry.b.shape[1]) if isinstance(entry, LowRank) else ("dense", 0)


def _pick(batch: Tensor, items: list[int]) -> Tensor:
    """batch[items], without a copy when that is the whole batch."""
    return batch if len(items) == batch.shape[0] else batch[items]


def _base_entries(cache: BaseSpectra, names: list[str], w0: Tensor, top_k: int, density: float) -> None:
    """Fill the cache entries missing for a batch of base matrices (w0 [B, m, n] on the device)."""
    shape = tuple(w0.shape[1:])
    k, rank = geometry_ranks(shape)
    wanted = min(max(top_k, k, rank), *shape)
    todo = [i for i, n in enumerate(names) if n not in cache or cache[n]["density"] != density
            or cache[n]["rank"] != rank or cache[n]["u"].shape[1] < wanted]
    if not todo:
        return
    batch = w0[todo]
    sigma, u = gram_spectra(batch, wanted)
    masks = pack_masks(_masks(batch, u, rank, density))
    norms = _sq(batch)
    for j, i in enumerate(todo):
        cache[names[i]] = {"sigma": sigma[j].cpu(), "u": u[j].cpu(), "mask": masks[j].cpu(),
                           "norm_sq": float(norms[j]), "rank": rank, "density": density}


def _masks(w: Tensor, u: Tensor, rank: int, density: float) -> Tensor:
    """Principal masks of a batch from its top vectors (drift.principal_mask): [B, m, n] bool."""
    recon = principal_reconstruction(w, u[..., :rank])
    cuts = top_thresholds(recon.flatten(1), density)
    return (recon >= cuts.to(recon).view(-1, 1, 1)) & (recon > 0)


@torch.no_grad()
def weight_drift(base: dict[str, Tensor], current: dict, previous: dict | None = None, *, top_k: int = 8,
                 tol: float = 1e-3, density: float = MASK_DENSITY, device: torch.device | str | None = None,
                 cache: dict | None = None, update: bool = True, geometry: bool = True,
                 batch_bytes: int = BATCH_BYTES) -> dict[str, float]:
    """The drift record of `current` against `base` (and `previous`): drift.parameter_drift's keys when
    `update`, drift.principal_drift's when `geometry` (both by default), same definitions.

    `current` and `previous` map names to weights or to `LowRank` updates of the base weight. `device`:
    where to compute (default: where the base tensors are). `cache`: a `BaseSpectra` (or a plain dict)
    kept across calls, filled here where missing.
    """
    device = torch.device(device) if device is not None else next(iter(base.values())).device
    with fixed_threads(device):
        return _record(base, current, previous, top_k, tol, density, device, cache, update, geometry,
                       batch_bytes)


def _record(base, current, previous, top_k, tol, density, device, cache, update, geometry, batch_bytes):
    cache = cache if cache is not None else BaseSpectra()
    previous = previous or {}
    names = _untied_names(base, current)
    rows: dict[str, dict] = {}
    groups: dict[tuple, list[str]] = {}
    for n in names:
        key = (tuple(base[n].shape), _dtype(current[n]), _form(current[n]),
               _form(previous[n]) if n in previous else None)
        groups.setdefault(key, []).append(n)
    for (shape, dtype, _, _), group in groups.items():
        per_batch = max(1, batch_bytes // (8 * math.prod(shape) or 1))
        for i in range(0, len(group), per_batch):
            chunk = group[i:i + per_batch]
            rows.update(_batch(chunk, base, current, previous, dtype, device, cache, top_k, tol, density,
                               update, geometry))
    return _assemble(names, rows, previous, update, geometry)


def _batch(chunk, base, current, previous, dtype, device, cache, top_k, tol, density, update, geometry):
    """The per-matrix numbers of one batch of same-shaped, same-form tensors."""
    w0 = _stack([base[n] for n in chunk], device, dtype)
    first = current[chunk[0]]
    lowrank = isinstance(first, LowRank)
    if lowrank:
        b = _stack([current[n].b for n in chunk], device, torch.float64)
        a = _stack([current[n].a for n in chunk], device, torch.float64)
        delta = (b @ a).to(dtype)  # for the entry-wise numbers and W_t's own spectrum only
        wt = w0 + delta  # as peft merges: W + (B A) in the weights' precision
        diff_sq = lowrank_frobenius_sq(b, a)
    else:
        same = all(current[n] is base[n] for n in chunk)  # LoRA's frozen weights: no second transfer
        wt = w0 if same else _stack([current[n] for n in chunk], device, dtype)
        delta = wt - w0
        diff_sq = _sq(delta)
    ref_sq = _sq(w0)
    flat = delta.abs().flatten(1)
    peak = flat.amax(1)
    unchanged = (flat <= tol * peak.unsqueeze(1)).sum(1)
    diff_sq, ref_sq, unchanged, peak = (x.tolist() for x in (diff_sq, ref_sq, unchanged, peak))  # one sync each
    rows = {n: {"diff_sq": diff_sq[j], "ref_sq": ref_sq[j], "numel": delta[j].numel(), "unchanged": float(unchanged[j]),
                "moved": peak[j] > 0} for j, n in enumerate(chunk)}
    if previous and chunk[0] in previous:
        _previous(chunk, rows, base, previous, w0, b if lowrank else None, a if lowrank else None,
                  None if lowrank else wt, device, dtype)
    shape = tuple(w0.shape[1:])
    if len(shape) != 2 or min(shape) < 2:
        return rows
    _base_entries(cache, chunk, w0, top_k, density)
    moved = [j for j, n in enumerate(chunk) if rows[n]["moved"]]
    if update and module_kind(chunk[0]) != "embedding":
        k = max(1, min(top_k, min(shape)))
        for n in chunk:
            rows[n]["rank"] = rows[n]["overlap"] = float("nan")
        if moved:
            if lowrank:
                s, u = lowrank_spectrum(_pick(b, moved), _pick(a, moved), k)
            else:
                s, u = gram_spectra(_pick(delta, moved), k)
            for j, i in enumerate(moved):
                n = chunk[i]
                rows[n]["rank"] = _rank_from_singular_values(s[j])
                rows[n]["overlap"] = _overlap(u[j], s[j], shape, cache[n]["u"][:, :k].to(u), k, eps=F32_EPS)
    if geometry:
        _geometry(chunk, rows, moved, w0, wt, delta, cache, density)
    return rows


def _previous(chunk, rows, base, previous, w0, b, a, wt, device, dtype) -> None:
    """||current - previous||^2 and ||previous||^2 per matrix; from the factors when both are low-rank."""
    if b is not None and isinstance(previous[chunk[0]], LowRank):
        bp = _stack([previous[n].b for n in chunk], device, torch.float64)
        ap = _stack([previous[n].a for n in chunk], device, torch.float64)
        diff = lowrank_frobenius_sq(torch.cat([b, -bp], -1), torch.cat([a, ap], -2))
        # ||W_0 + b_p a_p||^2 = ||W_0||^2 + 2 <b_p^T W_0, a_p> + ||b_p a_p||^2
        cross = (project64(bp, w0) * ap).flatten(1).sum(1)
        prev_sq = _sq(w0) + 2 * cross + lowrank_frobenius_sq(bp, ap)
    else:
        wt = wt if wt is not None else w0 + (b @ a).to(dtype)
        wp = torch.stack([w0[j] + previous[n].dense(dtype).to(device) if isinstance(previous[n], LowRank)
                          else w0[j] if previous[n] is base[n]  # a frozen weight: no second transfer
                          else previous[n].detach().to(device, dtype) for j, n in enumerate(chunk)])
        diff, prev_sq = _sq(wt - wp), _sq(wp)
    for n, d, p in zip(chunk, diff.tolist(), prev_sq.tolist()):
        rows[n]["prev_diff_sq"], rows[n]["prev_sq"] = d, p


def _geometry(chunk, rows, moved, w0, wt, delta, cache, density) -> None:
    """drift.weight_geometry of each matrix of the batch against its cached base."""
    shape = tuple(w0.shape[1:])
    k, rank = geometry_ranks(shape)
    entries = [cache[n] for n in chunk]
    for j, n in enumerate(chunk):  # an unmoved matrix is its base: the base's own spectra and mask
        if j not in moved:
            u0 = entries[j]["u"][:, :k].to(w0.device)
            full = _numerical_rank(entries[j]["sigma"], shape, F32_EPS) >= k
            rows[n].update(spectral_shift=0.0, max_angle=max_principal_angle(u0, u0) if full else float("nan"),
                           principal_mask_overlap=1.0, principal_update_share=float("nan"))
    if not moved:
        return
    wtm, dm = _pick(wt, moved), _pick(delta, moved)
    sigma, u = gram_spectra(wtm, min(max(k, rank), *shape))
    mask = _masks(wtm, u, rank, density)
    u0 = torch.stack([entries[i]["u"][:, :k] for i in moved]).to(u)
    mask0 = unpack_masks(torch.stack([entries[i]["mask"] for i in moved]).to(u.device), shape)
    moved_abs = dm.abs()
    update_cuts = top_thresholds(moved_abs.flatten(1), density)
    updated = (moved_abs >= update_cuts.to(moved_abs).view(-1, 1, 1)) & (moved_abs > 0)
    inter_mask, size_mask0, inter_update, size_update = (x.flatten(1).sum(1).tolist() for x in (
        mask0 & mask, mask0, updated & mask0, updated))
    for j, i in enumerate(moved):
        entry, n = entries[i], chunk[i]
        sigma0 = entry["sigma"].to(sigma)
        full = all(_numerical_rank(s, shape, F32_EPS) >= k for s in (sigma0, sigma[j]))
        rows[n].update(
            spectral_shift=spectral_shift(sigma[j], sigma0),
            max_angle=max_principal_angle(u0[j][:, :k], u[j][:, :k]) if full else float("nan"),
            principal_mask_overlap=inter_mask[j] / size_mask0[j] if size_mask0[j] else float("nan"),
            principal_update_share=inter_update[j] / size_update[j] if size_update[j] else float("nan"))


def _assemble(names: list[str], rows: dict[str, dict], previous: dict, update: bool, geometry: bool
              ) -> dict[str, float]:
    """The record's keys from the per-matrix numbers (the sums and means of drift.parameter_drift and
    drift.principal_drift)."""
    def ratio(num: float, den: float) -> float:
        return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")

    by_kind: dict[str, list[str]] = {}
    for n in names:
        by_kind.setdefault(module_kind(n), []).append(n)
    out: dict[str, float] = {}
    if update:
        out["rel_l2_base"] = ratio(sum(rows[n]["diff_sq"] for n in names), sum(rows[n]["ref_sq"] for n in names))
        if previous:
            prev = [n for n in names if n in previous]
            out["rel_l2_prev"] = ratio(sum(rows[n]["prev_diff_sq"] for n in prev),
                                       sum(rows[n]["prev_sq"] for n in prev))
        for kind in KINDS:
            if kind in by_kind:
                group = by_kind[kind]
                out[f"rel_l2_base/{kind}"] = ratio(sum(rows[n]["diff_sq"] for n in group),
                                                   sum(rows[n]["ref_sq"] for n in group))
        out["update_norm"] = math.sqrt(sum(rows[n]["diff_sq"] for n in names))
        total = sum(rows[n]["numel"] for n in names)
        out["sparsity"] = sum(rows[n]["unchanged"] for n in names) / total if total else float("nan")
        for kind in KINDS:
            if kind in by_kind:
                size = sum(rows[n]["numel"] for n in by_kind[kind])
                if size:
                    out[f"sparsity/{kind}"] = sum(rows[n]["unchanged"] for n in by_kind[kind]) / size
        out["effective_rank"] = _mean([rows[n]["rank"] for n in names if "rank" in rows[n]])
        out["subspace_overlap"] = _mean([rows[n]["overlap"] for n in names if "overlap" in rows[n]])
        out["num_tensors"] = float(len(names))
    if geometry:
        spectral = {kind: [n for n in group if "spectral_shift" in rows[n]] for kind, group in by_kind.items()}
        spectral = {kind: group for kind, group in spectral.items() if group}
        for metric in GEOMETRY_METRICS:
            out[metric] = _mean([rows[n][metric] for group in spectral.values() for n in group])
            for kind in KINDS:
                if kind in spectral:
                    out[f"{metric}/{kind}"] = _mean([rows[n][metric] for n in spectral[kind]])
    return out
