"""Parameter drift: how far, how sparsely and in which directions training moved the weights.

Pure functions of tensors (state dicts name -> Tensor). The update of a weight is
delta = current - base (or current - previous stage). Spectral metrics follow:
  effective rank    Roy & Vetterli 2007: exp(H(p)), p_i = sigma_i / sum_j sigma_j.
  subspace overlap  "The Path Not Taken" (arXiv 2511.08567): RL updates tend to avoid the base
                    weight's principal directions; we report the mean cos^2 of the principal angles
                    between the update's and the base weight's top-k left singular subspaces.
All sums run in float32 or better, whatever the weights' dtype. `parameter_drift` gives the same
bits at any CPU thread count (see fixed_threads).

Weight geometry after "The Path Not Taken" (`principal_drift`), each 2-D weight W_t against its base W_0
(an [m, n] matrix, embeddings included), then the plain mean over matrices, overall and per module kind:
  spectral_shift          ||sigma(W_t) - sigma(W_0)||_2 / ||sigma(W_0)||_2, full descending spectra.
  max_angle               the largest principal angle, in degrees, between the top-k left singular
                          subspaces of W_0 and W_t, k = round(min(m, n) / 8) (96 for a 768-wide matrix).
  principal_mask_overlap  |M_0 & M_t| / |M_0|, M = the principal mask: the top rho = 0.5 fraction of
                          entries by magnitude of the rank-r reconstruction U_r U_r^T W, r = round(min(m, n)
                          / 64) (12 for 768). The random baseline is rho.
  principal_update_share  |U & M_0| / |U|, U = the top rho fraction of the entries of |W_t - W_0| (the
                          entries that moved most, non-zero ones only). A random placement gives rho; below
                          rho, the updates avoid the base's principal weights.
Where the choices come from: PNT's own values could not be read here (only its abstract); k = 512,
r = 64 and alpha = 0.5 on Qwen3-8B's 4096-wide matrices are those of the PNT-style diagnostics in arXiv
2606.07082 (appendix C.3), scaled here as fractions of min(m, n) so they fit a 96-wide tiny model too.
There the update mask is the set of entries that moved by more than 1e-3 of their magnitude (bf16-visible
changes); cptlab's weights are float32 and AdamW moves nearly every entry past that, which would make
the share equal rho by construction, hence the top-rho update mask. Moenupa/SDPO-CL publishes the
curves (max angle ~0 degrees for GRPO, 2.5-3.3 for SDPO) but not the code or the parameters behind them.
The spectra come from the float64 Gram eigendecomposition used above (one per matrix and record; the
base's spectrum, top vectors and mask are cached); the angle is taken as arcsin ||(I - U_0 U_0^T) U_t||_2,
which stays accurate for angles far below a degree.

This module holds the definitions, one matrix at a time (the readable reference, tested against hand
numbers). The record over a whole model (`parameter_drift`, `principal_drift`, or both in one pass with
`drift_record.weight_drift`) is computed in batches on the device by drift_record.py / spectra.py, which
reach the numbers of these definitions (tests/test_spectra.py).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor

from .spectra import LowRank, gram_spectra

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
    """(all singular values, descending; top-k left singular vectors [m, k]) of one matrix: the float64
    Gram route of spectra.gram_spectra on a batch of one (on an H100 about 4x faster than an SVD of a
    768 x 2048 float32 matrix; singular values carry an absolute error near 1e-8 * the largest)."""
    s, u = gram_spectra(matrix.detach().unsqueeze(0), k)
    return s[0], u[0]


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


def _untied_names(base: dict[str, Tensor], current: dict) -> list[str]:
    """Names of floating tensors present in both dicts with one shape, tied duplicates dropped.

    A duplicate is a tensor sharing storage with an earlier one, or an lm_head weight equal to an
    embedding weight in both dicts (tied embeddings, after a round trip through safetensors). A
    `LowRank` entry of `current` (an update of the base weight) counts as a floating tensor of its shape.
    """
    names, seen_ptrs = [], set()
    embeddings = [n for n in current if "embed_tokens" in n or n.endswith("wte.weight")]
    for n, t in current.items():
        if n not in base or tuple(base[n].shape) != tuple(t.shape):
            continue
        if isinstance(t, LowRank):
            names.append(n)
            continue
        if not t.is_floating_point():
            continue
        ptr = (t.device, t.data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen_ptrs:
            continue
        if "lm_head" in n and any(e in base and isinstance(current[e], Tensor) and current[e].shape == t.shape
                                  and torch.equal(current[e], t) and torch.equal(base[e], base[n])
                                  for e in embeddings):
            continue
        seen_ptrs.add(ptr)
        names.append(n)
    return names


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def fixed_threads(device: torch.device):
    """A context that runs torch on one CPU thread when `device` is the CPU (else does nothing): LAPACK's
    eigh and large reductions split their work by the thread count, and the last digits of
    effective_rank and subspace_overlap followed it (measured: 1 vs 2 threads)."""
    return _OneThread() if device.type == "cpu" else contextlib.nullcontext()


class _OneThread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def parameter_drift(base: dict[str, Tensor], current: dict, previous: dict | None = None,
                    top_k: int = 8, tol: float = 1e-3, device: torch.device | str | None = None,
                    base_subspaces: dict | None = None) -> dict[str, float]:
    """Drift numbers of `current` weights against the base (and the previous stage's) weights.

    Keys:
      rel_l2_base, rel_l2_base/<kind>   ||theta - theta_0|| / ||theta_0||, all tensors, and per
                                        module kind present (attention, mlp, embedding, norm, other)
      rel_l2_prev                       ||theta - theta_prev|| / ||theta_prev|| (when `previous` is given)
      update_norm                       ||theta - theta_0|| (absolute)
      sparsity, sparsity/<kind>         fraction of entries left unchanged (update_sparsity, each
                                        tensor against its own largest change), entry-weighted
      effective_rank, subspace_overlap  means over the 2-D updates (NaN ones skipped); embedding
                                        matrices are left out (vocabulary-sized spectra, row-sparse
                                        updates of the tokens seen)
      num_tensors                       tensors compared (tied duplicates skipped)

    `current` / `previous` may hold `LowRank` updates of the base weights (a LoRA run: see
    lora.lowrank_updates). Computed by drift_record.weight_drift: batches of same-shaped matrices on
    `device` (default: where the base tensors are), one thread on the CPU. `base_subspaces`: a cache
    of the base weights' spectra (a `BaseSpectra` or a dict) kept across calls, filled where missing;
    pass the same one to `principal_drift`, or call `weight_drift` for both key sets in one pass.
    """
    from .drift_record import weight_drift

    return weight_drift(base, current, previous, top_k=top_k, tol=tol, device=device, cache=base_subspaces,
                        geometry=False)


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


def principal_drift(base: dict[str, Tensor], current: dict, density: float = MASK_DENSITY,
                    device: torch.device | str | None = None, cache: dict | None = None) -> dict[str, float]:
    """`weight_geometry` of every 2-D weight (embeddings and lm_head included, tied duplicates once),
    averaged over the matrices with equal weight (as PNT does), overall and per module kind.

    Keys: spectral_shift, max_angle, principal_mask_overlap, principal_update_share, each also as
    <key>/<kind>. Computed by drift_record.weight_drift in batches on `device` (default: where the
    tensors are); `cache` (a `BaseSpectra` or a dict) keeps each base matrix's spectrum, top vectors and
    mask cut by name across calls (filled here where missing).
    """
    from .drift_record import weight_drift

    return weight_drift(base, current, None, density=density, device=device, cache=cache, update=False)
