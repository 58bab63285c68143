"""The linear algebra behind one parameter-drift record (drift.py), built to stay affordable at billions of
parameters: same-shaped matrices in batches on the compute device, low-rank updates kept as their
factors, and the base weights' spectra computed once per run and cached (in memory, optionally on disk).

Owns: `gram_spectra` (float64 Gram eigendecompositions of a batch), `LowRank` (an update B @ A kept
as factors) with its norms and spectrum from the factors, `top_thresholds` (the cut of a top-fraction
mask, batched), and `BaseSpectra` (the cache of the base's spectra, top singular vectors, principal-mask
thresholds and norms, with atomic save/load).

Precision, and why float64 stays for the spectra. Every spectral quantity of the record needs a full
spectrum: the update's effective rank reads all its singular values, the spectral shift all of W_t's
and W_0's. The Gram route squares the condition number: an eigensolver's eigenvalue error is about
eps * sigma_max^2, so singular values below sqrt(eps) * sigma_max are noise. In float32 that floor is
3.5e-4 * sigma_max: the ~2500 zero singular values of a rank-16 update of a 2560-wide random matrix
read up to ~4e-4 sigma_max and its effective rank comes out 17.2 instead of 16.0 (measured;
tests/test_spectra.py shows the same on a 256 x 384 matrix of rank 2: 2.11 for 2.00); and the spectral
shift of a small update (about rel_l2 / sqrt(m), ~1e-6) sits below even a float32 SVD's error (~1e-7
sigma_max per value). In float64 the floor is 1.5e-8 *
sigma_max. So the Grams are accumulated and decomposed in float64 (on an H100/H200 float64 runs at half
the float32 rate, not 1/64 as on consumer GPUs), while everything entry-wise (deltas, sparsity, masks)
stays in float32 (a difference of two float32 weights is exact when they are within a factor 2 of each
other, i.e. for any small update) with sums accumulated in float64. Randomized or top-k methods
(`torch.svd_lowrank`) are not used: the metrics need full spectra, and the k = min(m, n) / 8 vectors of
the principal angle sit in the flat part of a weight's spectrum, where subspace iteration converges
slowly and would bias the angle towards its starting point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

CHUNK_BYTES = 256 * 2 ** 20
"""Float64 working set of one chunk when a Gram or a product is accumulated piecewise (bytes)."""


class LowRank(NamedTuple):
    """A weight update kept as its factors: delta W = b @ a, b [m, r], a [r, n] (LoRA: b = (alpha / r) * B,
    a = A). A state dict given to the drift functions may hold one in place of a weight: the weight is
    then the base's plus b @ a."""

    b: Tensor
    a: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    def dense(self, dtype=torch.float32) -> Tensor:
        """b @ a as a matrix (for the entry-wise metrics, one batch at a time on the device)."""
        return self.b.to(dtype) @ self.a.to(dtype)


def lowrank_frobenius_sq(b: Tensor, a: Tensor) -> Tensor:
    """||b @ a||_F^2 = tr((b^T b)(a a^T)) from two r x r Grams, never the m x n product: [.., m, r],
    [.., r, n] -> [..] (float64)."""
    b, a = b.double(), a.double()
    return ((b.mT @ b) * (a @ a.mT)).sum((-2, -1))


def lowrank_spectrum(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(singular values, descending, [r]; top-k left singular vectors [m, min(k, r)]) of b @ a from the QR
    of the factors: b = Q_b R_b, a^T = Q_a R_a, so b a = Q_b (R_b R_a^T) Q_a^T and the spectrum is that of
    the r x r core. The other min(m, n) - r singular values are zero. Float64."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().mT)
    uc, s, _ = torch.linalg.svd(rb @ ra.mT)
    return s, qb @ uc[..., :k]


def _pieces(length: int, other: int, batch: int) -> int:
    """Rows per piece so that a float64 [batch, piece, other] block stays near CHUNK_BYTES."""
    return max(1, min(length, CHUNK_BYTES // max(1, 8 * other * batch)))


def gram64(a: Tensor) -> Tensor:
    """The smaller Gram of a batch, accumulated in float64 over pieces of the long side (no float64 copy
    of the whole batch): [B, m, n] -> [B, min(m, n), min(m, n)]; A A^T when m <= n, else A^T A."""
    m, n = a.shape[-2:]
    t = a if m <= n else a.mT  # [B, small, long]
    small, long = t.shape[-2:]
    gram = torch.zeros(*t.shape[:-2], small, small, dtype=torch.float64, device=a.device)
    step = _pieces(long, small, a.shape[0] if a.dim() == 3 else 1)
    for j in range(0, long, step):
        piece = t[..., j:j + step].double()
        gram += piece @ piece.mT
    return gram


def gram_spectra(a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(all singular values, descending, [B, min(m, n)]; top-k left singular vectors [B, m, k]) of a batch
    of matrices, from the float64 eigendecomposition of their Grams (singular values carry an absolute
    error near 1e-8 * the largest). k <= min(m, n)."""
    m, n = a.shape[-2:]
    evals, evecs = torch.linalg.eigh(gram64(a))
    s = evals.flip(-1).clamp_min(0).sqrt()
    vecs = evecs.flip(-1)[..., :k]
    if m <= n:
        return s, vecs  # left singular vectors directly
    top = s[..., :k]
    scale = torch.where(top > 0, top, torch.ones_like(top)).unsqueeze(-2)
    u = torch.empty(*a.shape[:-1], k, dtype=torch.float64, device=a.device)
    step = _pieces(m, n, a.shape[0] if a.dim() == 3 else 1)
    for i in range(0, m, step):  # U = A W / s, piece by piece of rows
        u[..., i:i + step, :] = (a[..., i:i + step, :].double() @ vecs) / scale
    return s, u


def top_thresholds(values: Tensor, fraction: float) -> Tensor:
    """Per row of a [B, N] non-negative tensor, the value at which its top ceil(fraction * N) entries begin
    (the cut of drift.top_fraction: the mask is values >= cut and values > 0): [B, N] -> [B]."""
    count = min(values.shape[-1], max(1, math.ceil(fraction * values.shape[-1])))
    index = values.shape[-1] - count  # the threshold's place in ascending order
    if values.device.type == "cpu":  # numpy's introselect: 20x faster than torch.kthvalue on 1.5M entries
        rows = values.detach().numpy()
        return torch.as_tensor(np.stack([np.partition(r, index)[index] for r in rows]))
    return torch.kthvalue(values, index + 1, dim=-1).values


def pack_masks(mask: Tensor) -> Tensor:
    """Bool masks [B, ...] as bits, 8 to a byte: -> uint8 [B, ceil(numel / 8)] (on the masks' device)."""
    flat = mask.flatten(1)
    pad = (-flat.shape[1]) % 8
    bits = torch.nn.functional.pad(flat.to(torch.uint8), (0, pad)).view(flat.shape[0], -1, 8)
    weights = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of pack_masks: uint8 [B, bytes] -> bool [B, *shape]."""
    weights = (2 ** torch.arange(8, device=packed.device)).to(torch.uint8)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.flatten(1)[:, :math.prod(shape)].view(packed.shape[0], *shape)


def project64(u: Tensor, w: Tensor) -> Tensor:
    """u^T w in float64, accumulated over pieces of the rows (no float64 copy of w): [B, m, r], [B, m, n]
    -> [B, r, n]."""
    out = torch.zeros(*u.shape[:-2], u.shape[-1], w.shape[-1], dtype=torch.float64, device=w.device)
    step = _pieces(w.shape[-2], w.shape[-1], w.shape[0] if w.dim() == 3 else 1)
    for i in range(0, w.shape[-2], step):
        out += u[..., i:i + step, :].double().mT @ w[..., i:i + step, :].double()
    return out


def principal_reconstruction(w: Tensor, u_rank: Tensor) -> Tensor:
    """|U_r U_r^T W|, the magnitudes the principal mask ranks (float64): [B, m, n], [B, m, r] -> [B, m, n]."""
    return (u_rank @ project64(u_rank, w)).abs_()


SCALARS = ("norm_sq", "rank", "density")
PARTS = ("sigma", "u", "mask")


class BaseSpectra(dict):
    """name -> the base weight's spectral facts, computed once per run (drift.weight_drift fills it):
    a dict of {"sigma": [min(m, n)] float64 singular values, "u": [m, K] float64 top-K left singular
    vectors, "mask": the principal mask (drift.principal_mask) as bits (pack_masks), "norm_sq":
    ||W_0||_F^2, "rank": r, "density": rho} for each 2-D weight. Entries live on the CPU (at 4B the
    vectors take ~2.7 GB in float64, the masks 0.5 GB) and travel to the device batch by batch.

    `save(path)` writes the cache atomically (one safetensors file); `load(path, base)` reads it
    back, keeping only the entries whose shape and norm match the given base weights (a cache of another
    base is ignored, entry by entry). `unsaved`: entries were added since the last save or load."""

    unsaved = False

    def __setitem__(self, name, entry) -> None:
        super().__setitem__(name, entry)
        self.unsaved = True

    def save(self, path: str | Path) -> None:
        """Write the cache as one safetensors file (the scalars in its metadata), atomically."""
        from safetensors.torch import save

        from ..store import atomic_write_bytes

        tensors, index = {}, {}
        for name, entry in self.items():
            for part in PARTS:
                tensors[f"{name}/{part}"] = entry[part].contiguous()
            index[name] = {k: entry[k] for k in SCALARS}
        atomic_write_bytes(Path(path), save(tensors, metadata={"index": json.dumps(index)}))
        self.unsaved = False

    @classmethod
    def load(cls, path: str | Path, base: dict[str, Tensor] | None = None) -> "BaseSpectra":
        """The cache at `path` (empty when there is none or it cannot be read: it is only a cache)."""
        from safetensors import SafetensorError, safe_open

        out = cls()
        try:
            with safe_open(str(path), framework="pt") as f:
                index = json.loads(f.metadata()["index"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return out
        for name, meta in index.items():
            entry = {**{k: meta[k] for k in SCALARS}, **{part: tensors.get(f"{name}/{part}") for part in PARTS}}
            if any(entry[part] is None for part in PARTS):
                continue
            if base is not None and not matches(entry, base.get(name)):
                continue
            out[name] = entry
        out.unsaved = False
        return out


def matches(entry: dict, weight: Tensor | None) -> bool:
    """Whether a cached entry belongs to this base weight (its row count and squared norm, to 1e-6)."""
    if weight is None or weight.dim() != 2 or entry["u"].shape[0] != weight.shape[0] \
            or entry["sigma"].shape[0] != min(weight.shape):
        return False
    norm_sq = float(weight.detach().double().pow(2).sum())
    return math.isclose(norm_sq, entry["norm_sq"], rel_tol=1e-6, abs_tol=1e-30)
