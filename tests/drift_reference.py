"""The drift record as computed before the batched engine (cptlab.analysis.drift at ea9e252, kept verbatim
below this docstring as the reference implementation): per matrix, float64 Gram eigendecompositions on
one CPU thread. tests/test_spectra.py checks the new record against it; benchmarks/drift_scale.py times it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

KINDS = ("attention", "mlp", "embedding", "norm", "other")
_ATTENTION = ("self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn")
_MLP = ("mlp", "gate_proj", "up_proj", "down_proj", "feed_forward", "c_fc")
_EMBEDDING = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")


def module_kind(param_name: str) -> str:
    """'attention' | 'mlp' | 'embedding' | 'norm' | 'other' from a HF (Qwen2 / Llama) parameter name.

    Embeddings are checked first (lm_head too), then norms (so self_attn.q_norm is a norm), then
    attention, then MLP.
    """
    name = param_name.lower()
    parts = name.split(".")
    if any(key in parts for key in _EMBEDDING):
        return "embedding"
    if any("norm" in part or part in ("ln_f", "ln_1", "ln_2") for part in parts):
        return "norm"
    if any(key in parts for key in _ATTENTION):
        return "attention"
    if any(key in parts for key in _MLP):
        return "mlp"
    return "other"


def _f(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def relative_l2(current: dict[str, Tensor], reference: dict[str, Tensor], names=None) -> float:
    """||current - reference|| / ||reference||, both norms over all `names` (default: common keys).

    Every tensor is flattened into one long vector, so big matrices weigh more. NaN when the
    reference norm is 0 or there are no tensors.
    """
    names = [n for n in (names if names is not None else current) if n in reference]
    diff_sq = ref_sq = 0.0
    for n in names:
        cur, ref = _f(current[n]), _f(reference[n])
        diff_sq += float((cur - ref).pow(2).sum())
        ref_sq += float(ref.pow(2).sum())
    return math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else float("nan")


def _rank_from_singular_values(s: Tensor) -> float:
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(matrix: Tensor) -> float:
    """exp(-sum_i p_i log p_i), p = singular values / their sum (Roy & Vetterli 2007): [m, n] -> float.

    Equals r for a matrix with r equal non-zero singular values; between 1 and min(m, n) otherwise.
    0.0 for the zero matrix.
    """
    return _rank_from_singular_values(torch.linalg.svdvals(_f(matrix)))


def update_sparsity(delta: Tensor, tol: float = 1e-3) -> float:
    """Fraction of entries with |delta| <= tol * max|delta|: any shape -> float in [0, 1].

    Relative to the tensor's own largest change, so that the answer does not depend on the learning
    rate; tol = 1e-3 also counts as unchanged the entries that bf16 rounding moved by an ulp or so
    when the largest change is big. 1.0 for an all-zero delta (nothing moved).
    """
    a = _f(delta).abs()
    if a.numel() == 0:
        return float("nan")
    peak = a.max()
    if peak == 0:
        return 1.0
    return float((a <= tol * peak).float().mean())


def _numerical_rank(s: Tensor, shape: tuple[int, ...], eps: float | None = None) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = s[0] * max(shape) * (torch.finfo(s.dtype).eps if eps is None else eps)
    return int((s > tol).sum())


def _gram_spectrum(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(all singular values, descending; top-k left singular vectors [m, k]) of a matrix, from the
    eigendecomposition of its float64 Gram matrix (on an H100 about 4x faster than an SVD of a
    768 x 2048 float32 matrix; singular values carry an absolute error near 1e-8 * the largest)."""
    a = matrix.detach().to(torch.float64)
    m, n = a.shape
    if m <= n:
        evals, evecs = torch.linalg.eigh(a @ a.T)  # left singular vectors directly
        s = evals.flip(0).clamp_min(0).sqrt()
        return s, evecs.flip(1)[:, :k]
    evals, evecs = torch.linalg.eigh(a.T @ a)  # right singular vectors W: U = A W / s
    s = evals.flip(0).clamp_min(0).sqrt()
    w = evecs.flip(1)[:, :k]
    top = s[:k]
    u = (a @ w) / torch.where(top > 0, top, torch.ones_like(top))
    return s, u


def top_left_singular(matrix: Tensor, k: int = 8) -> Tensor:
    """The top-k left singular vectors of a matrix, [m, n] -> [m, min(k, m, n)] (float64)."""
    return _gram_spectrum(matrix, min(k, *matrix.shape))[1]


def _overlap(u: Tensor, s: Tensor, shape: tuple[int, ...], v: Tensor, k: int, eps: float | None = None) -> float:
    k_update = min(k, _numerical_rank(s, shape, eps))
    if k_update == 0:
        return float("nan")
    cosines = u[:, :k_update].T @ v.to(u.dtype)  # [k_u, k]; its singular values are the cos(theta_i)
    return float(cosines.pow(2).sum() / k_update)


def subspace_overlap(update: Tensor, base_weight: Tensor, k: int = 8) -> float:
    """Mean cos^2 of the principal angles between the top-k left singular subspaces: [m, n] x2 -> float.

    U = top-k_u left singular vectors of `update`, k_u = min(k, numerical rank of the update) (the
    directions past its rank are arbitrary); V = top-k of `base_weight`. Returns ||U^T V||_F^2 / k_u,
    the mean of cos^2 over the k_u principal angles: 1 when the update lies inside the base's top-k
    subspace, 0 when orthogonal to it, about k / m for a random update. NaN for a zero update.
    """
    if update.shape != base_weight.shape or update.dim() != 2:
        raise ValueError(f"subspace_overlap: need two matrices of one shape, got {tuple(update.shape)} "
                         f"and {tuple(base_weight.shape)}")
    k = max(1, min(k, min(update.shape)))
    u, s, _ = torch.linalg.svd(_f(update), full_matrices=False)
    v = torch.linalg.svd(_f(base_weight), full_matrices=False)[0][:, :k]
    return _overlap(u, s, tuple(update.shape), v, k)


def update_spectrum(delta: Tensor, base_top: Tensor, k: int = 8) -> tuple[float, float]:
    """(effective_rank(delta), subspace_overlap(delta, base)) from one spectral decomposition of the
    update, where `base_top` = top_left_singular(base_weight, k) (the same for every stage, so
    callers keep it). The numerical rank that caps k uses a float32 tolerance (the weights' precision;
    the Gram route resolves singular values only to about 1e-8 of the largest)."""
    k = max(1, min(k, min(delta.shape)))
    if delta.abs().max() == 0:
        return float("nan"), float("nan")
    s, u = _gram_spectrum(delta, k)
    return (_rank_from_singular_values(s), _overlap(u, s, tuple(delta.shape), base_top[:, :k].to(u), k,
                                                    eps=torch.finfo(torch.float32).eps))


def _untied_names(base: dict[str, Tensor], current: dict[str, Tensor]) -> list[str]:
    """Names of floating tensors present in both dicts with one shape, tied duplicates dropped.

    A duplicate is a tensor sharing storage with an earlier one, or an lm_head weight equal to an
    embedding weight in both dicts (tied embeddings, after a round trip through safetensors).
    """
    names, seen_ptrs = [], set()
    embeddings = [n for n in current if "embed_tokens" in n or n.endswith("wte.weight")]
    for n, t in current.items():
        if n not in base or base[n].shape != t.shape or not t.is_floating_point():
            continue
        ptr = (t.device, t.data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen_ptrs:
            continue
        if "lm_head" in n and any(e in base and current[e].shape == t.shape and torch.equal(current[e], t)
                                  and torch.equal(base[e], base[n]) for e in embeddings):
            continue
        seen_ptrs.add(ptr)
        names.append(n)
    return names


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _fixed_threads(fn):
    """Run fn with one CPU thread: LAPACK's eigh and large reductions split their work by the thread
    count, and the last digits of effective_rank and subspace_overlap followed it (measured: 1 vs 2
    threads). Work placed on a GPU is unaffected; the CPU part is small beside the spectra."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


@_fixed_threads
@torch.no_grad()
def parameter_drift(base: dict[str, Tensor], current: dict[str, Tensor], previous: dict[str, Tensor] | None = None,
                    top_k: int = 8, tol: float = 1e-3, device: torch.device | str | None = None,
                    base_subspaces: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Drift numbers of `current` weights against the base (and the previous stage's) weights.

    Keys:
      rel_l2_base, rel_l2_base/<kind>   ||theta - theta_0|| / ||theta_0||, all tensors, and per
                                        module kind present (attention, mlp, embedding, norm, other)
      rel_l2_prev                       the same against `previous` (when given)
      update_norm                       ||theta - theta_0|| (absolute)
      sparsity, sparsity/<kind>         fraction of entries left unchanged (update_sparsity, each
                                        tensor against its own largest change), entry-weighted
      effective_rank, subspace_overlap  means over the 2-D updates (NaN ones skipped); embedding
                                        matrices are left out (vocabulary-sized SVDs, row-sparse
                                        updates of the tokens seen)
      num_tensors                       tensors compared (tied duplicates skipped)

    The spectra (float64 Gram eigendecompositions) run on `device` (default: where the tensors are):
    1.1 s per call for a 76M model on an H100, 5.3 s on 2 CPU threads (benchmarks/bench_drift.py)
    before the CPU work was pinned to one thread (_fixed_threads).
    `base_subspaces`, when given, caches the base weights' top-k singular vectors by name across
    calls (filled here where missing).
    """
    names = _untied_names(base, current)
    out: dict[str, float] = {"rel_l2_base": relative_l2(current, base, names)}
    if previous is not None:
        out["rel_l2_prev"] = relative_l2(current, previous, [n for n in names if n in previous])
    by_kind: dict[str, list[str]] = {}
    for n in names:
        by_kind.setdefault(module_kind(n), []).append(n)
    for kind in KINDS:
        if kind in by_kind:
            out[f"rel_l2_base/{kind}"] = relative_l2(current, base, by_kind[kind])

    update_sq, kind_counts, ranks, overlaps = 0.0, {}, [], []
    for n in names:
        delta = _f(current[n]) - _f(base[n])
        update_sq += float(delta.pow(2).sum())
        unchanged, total = kind_counts.get(module_kind(n), (0.0, 0))
        kind_counts[module_kind(n)] = (unchanged + update_sparsity(delta, tol) * delta.numel(), total + delta.numel())
        if delta.dim() == 2 and module_kind(n) != "embedding" and min(delta.shape) > 1:
            cache = base_subspaces if base_subspaces is not None else {}
            if n not in cache:
                cache[n] = top_left_singular(base[n].to(device) if device is not None else base[n], top_k)
            rank, overlap = update_spectrum(delta.to(device) if device is not None else delta, cache[n], top_k)
            ranks.append(rank)
            overlaps.append(overlap)
    out["update_norm"] = math.sqrt(update_sq)
    unchanged_all = sum(u for u, _ in kind_counts.values())
    total_all = sum(t for _, t in kind_counts.values())
    out["sparsity"] = unchanged_all / total_all if total_all else float("nan")
    for kind in KINDS:
        if kind in kind_counts and kind_counts[kind][1]:
            out[f"sparsity/{kind}"] = kind_counts[kind][0] / kind_counts[kind][1]
    out["effective_rank"] = _mean(ranks)
    out["subspace_overlap"] = _mean(overlaps)
    out["num_tensors"] = float(len(names))
    return out


# -- weight geometry after "The Path Not Taken" (arXiv 2511.08567): W_t against the base W_0 -------------
ANGLE_RANK_FRACTION = 1 / 8
"""k of the principal angles: the top round(min(m, n) / 8) left singular vectors (at least 1); the
ratio of k = 512 on Qwen3-8B's 4096-wide matrices in the PNT-style diagnostics of arXiv 2606.07082."""
MASK_RANK_FRACTION = 1 / 64
"""r of the principal mask's rank-r reconstruction: round(min(m, n) / 64), at least 1 (r = 64 of 4096
there)."""
MASK_DENSITY = 0.5
"""rho: the principal mask holds this fraction of a matrix's entries, and the update mask the same
fraction of the entries that moved most (alpha = 0.5 there); the random baseline of the update share."""
GEOMETRY_METRICS = ("spectral_shift", "max_angle", "principal_mask_overlap", "principal_update_share")


def geometry_ranks(shape: tuple[int, ...]) -> tuple[int, int]:
    """(k of the principal angles, r of the principal mask) for an [m, n] matrix."""
    side = min(shape)
    return max(1, round(side * ANGLE_RANK_FRACTION)), max(1, round(side * MASK_RANK_FRACTION))


def spectral_shift(sigma: Tensor, sigma_base: Tensor) -> float:
    """||sigma(W_t) - sigma(W_0)|| / ||sigma(W_0)||: two [min(m, n)] descending spectra -> float (NaN if
    the base spectrum is zero)."""
    base_norm = float(torch.linalg.vector_norm(sigma_base))
    return float(torch.linalg.vector_norm(sigma - sigma_base)) / base_norm if base_norm > 0 else float("nan")


def max_principal_angle(u_base: Tensor, u: Tensor) -> float:
    """Largest principal angle, in degrees, between span(u_base) and span(u): [m, k] x2 orthonormal -> float.

    The sines of the principal angles are the singular values of (I - U_0 U_0^T) U_t; taking the
    arcsine of that residual (rather than the arccosine of sigma_min(U_0^T U_t)) keeps angles of a
    fraction of a degree accurate.
    """
    residual = u - u_base @ (u_base.T @ u)
    sin2 = float(torch.linalg.eigvalsh(residual.T @ residual)[-1])
    return math.degrees(math.asin(min(1.0, math.sqrt(max(0.0, sin2)))))


def top_fraction(values: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ceil(fraction * numel) largest entries of a non-negative tensor; entries tied with
    the last one are kept too, zeros never (an entry that did not move is not an update)."""
    flat = values.detach().reshape(-1)
    count = min(flat.numel(), max(1, math.ceil(fraction * flat.numel())))
    index = flat.numel() - count  # the threshold's place in ascending order
    if flat.device.type == "cpu":  # numpy's introselect: 20x faster than torch.kthvalue on 1.5M entries
        threshold = torch.as_tensor(np.partition(flat.numpy(), index)[index])
    else:
        threshold = torch.kthvalue(flat, index + 1).values
    return (values >= threshold) & (values > 0)


def principal_mask(weight: Tensor, rank: int, density: float = MASK_DENSITY, u_top: Tensor | None = None) -> Tensor:
    """Principal weights (LIFT, arXiv 2506.00772): the top `density` fraction of entries by magnitude of
    the rank-r reconstruction U_r U_r^T W of the matrix: [m, n] -> bool [m, n]. `u_top` ([m, >= r]): its
    top left singular vectors, when already known."""
    w = weight.detach().to(torch.float64)
    u = (u_top if u_top is not None else _gram_spectrum(w, rank)[1])[:, :rank].to(w)
    return top_fraction((u @ (u.T @ w)).abs(), density)


def mask_overlap(base_mask: Tensor, mask: Tensor) -> float:
    """|M_0 & M_t| / |M_0|: the share of the base's principal weights still principal (NaN if M_0 is empty)."""
    size = int(base_mask.sum())
    return int((base_mask & mask).sum()) / size if size else float("nan")


def principal_update_share(delta: Tensor, base_mask: Tensor, density: float = MASK_DENSITY) -> float:
    """Share of the updated entries that are principal weights of the base: |U & M_0| / |U|, where U is
    the top `density` fraction of |delta| (non-zero entries only). A random placement gives `density`;
    below it, updates avoid the principal weights. NaN when nothing moved."""
    updated = top_fraction(delta.abs(), density)
    size = int(updated.sum())
    return int((updated & base_mask).sum()) / size if size else float("nan")


def base_geometry(weight: Tensor, k: int, rank: int, density: float = MASK_DENSITY) -> tuple[Tensor, Tensor, Tensor]:
    """(singular values, top-max(k, r) left singular vectors, principal mask) of one matrix, from one
    float64 Gram eigendecomposition; what `weight_geometry` needs of W_0 (callers cache it per name)."""
    w = weight.detach().to(torch.float64)
    sigma, u = _gram_spectrum(w, min(max(k, rank), *w.shape))
    return sigma, u, principal_mask(w, rank, density, u)


def weight_geometry(base_weight: Tensor, weight: Tensor, k: int | None = None, rank: int | None = None,
                    density: float = MASK_DENSITY, base: tuple[Tensor, Tensor, Tensor] | None = None
                    ) -> dict[str, float]:
    """Spectral shift, largest principal angle (degrees) between the top-k left singular subspaces,
    principal-mask overlap and principal update share of W_t against W_0: [m, n] x2 -> dict.

    k and rank default to `geometry_ranks`; `base` = base_geometry(base_weight, k, rank, density) when
    cached. The angle is NaN when either matrix has numerical rank below k (its top-k subspace is then
    not determined); it is also ill-defined, for any update, when sigma_k(W_0) = sigma_{k+1}(W_0).
    """
    if weight.shape != base_weight.shape or weight.dim() != 2:
        raise ValueError(f"weight_geometry: need two matrices of one shape, got {tuple(base_weight.shape)} "
                         f"and {tuple(weight.shape)}")
    default_k, default_rank = geometry_ranks(tuple(weight.shape))
    k, rank = min(k or default_k, min(weight.shape)), min(rank or default_rank, min(weight.shape))
    sigma0, u0, mask0 = base if base is not None else base_geometry(base_weight, k, rank, density)
    w0, w = base_weight.detach().to(u0), weight.detach().to(u0)
    sigma, u, mask = base_geometry(w, k, rank, density)
    full_rank = all(_numerical_rank(s, tuple(w.shape), torch.finfo(torch.float32).eps) >= k for s in (sigma0, sigma))
    return {"spectral_shift": spectral_shift(sigma, sigma0),
            "max_angle": max_principal_angle(u0[:, :k], u[:, :k]) if full_rank else float("nan"),
            "principal_mask_overlap": mask_overlap(mask0, mask),
            "principal_update_share": principal_update_share(w - w0, mask0, density)}


@torch.no_grad()
def principal_drift(base: dict[str, Tensor], current: dict[str, Tensor], density: float = MASK_DENSITY,
                    device: torch.device | str | None = None, cache: dict | None = None) -> dict[str, float]:
    """`weight_geometry` of every 2-D weight (embeddings and lm_head included, tied duplicates once),
    averaged over the matrices with equal weight (as PNT does), overall and per module kind.

    Keys: spectral_shift, max_angle, principal_mask_overlap, principal_update_share, each also as
    <key>/<kind>. The spectra run on `device` (default: where the tensors are); `cache` keeps each base
    matrix's `base_geometry` by name across calls (filled here where missing).
    """
    cache = cache if cache is not None else {}
    per_kind: dict[str, list[dict[str, float]]] = {}
    for n in _untied_names(base, current):
        if current[n].dim() != 2 or min(current[n].shape) < 2:
            continue
        w0, w = (t.to(device) if device is not None else t for t in (base[n], current[n]))
        k, rank = geometry_ranks(tuple(w.shape))
        if n not in cache:
            cache[n] = base_geometry(w0, k, rank, density)
        per_kind.setdefault(module_kind(n), []).append(weight_geometry(w0, w, k, rank, density, cache[n]))
    out: dict[str, float] = {}
    for metric in GEOMETRY_METRICS:
        out[metric] = _mean([g[metric] for rows in per_kind.values() for g in rows])
        for kind in KINDS:
            if kind in per_kind:
                out[f"{metric}/{kind}"] = _mean([g[metric] for g in per_kind[kind]])
    return out
