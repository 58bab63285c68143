"""The "Path Not Taken" weight diagnostics (analysis/drift.py) on hand-built matrices whose answers are
worked out in the comments."""

import math

import pytest
import torch

from cptlab.analysis.drift import (
    geometry_ranks, mask_overlap, max_principal_angle, principal_drift, principal_mask, principal_update_share,
    spectral_shift, top_fraction, weight_geometry,
)


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def test_spectral_shift_by_hand():
    # sigma(W_0) = (3, 2, 1), sigma(W_t) = (3, 2, 1.5): ||(0, 0, 0.5)|| / ||(3, 2, 1)|| = 0.5 / sqrt(14)
    base, moved = torch.diag(torch.tensor([3.0, 2.0, 1.0])), torch.diag(torch.tensor([3.0, 2.0, 1.5]))
    assert weight_geometry(base, moved, k=1, rank=1)["spectral_shift"] == pytest.approx(0.5 / math.sqrt(14))
    assert spectral_shift(torch.ones(3), torch.zeros(3)) != spectral_shift(torch.ones(3), torch.zeros(3))  # NaN


def test_a_known_rotation_of_the_left_singular_vectors_gives_its_angle():
    # W_0 = U diag(s) V^T; W_t = R W_0 with R turning u_1 towards u_4 by 10 degrees. The spectrum is
    # unchanged; the top-2 subspace becomes span(cos u_1 + sin u_4, u_2): principal angles (10, 0).
    U, V = _orthonormal(6, 0), _orthonormal(5, 1)
    base = U[:, :5] @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    phi = math.radians(10.0)
    u1, u4 = U[:, 0], U[:, 3]
    rotation = (torch.eye(6, dtype=torch.float64) + math.sin(phi) * (torch.outer(u4, u1) - torch.outer(u1, u4))
                + (math.cos(phi) - 1) * (torch.outer(u1, u1) + torch.outer(u4, u4)))
    out = weight_geometry(base, rotation @ base, k=2, rank=1)
    assert out["max_angle"] == pytest.approx(10.0, abs=1e-6)
    assert out["spectral_shift"] == pytest.approx(0.0, abs=1e-12)
    # inside the top-4 subspace the rotation maps it onto itself: angle 0
    assert weight_geometry(base, rotation @ base, k=4, rank=1)["max_angle"] == pytest.approx(0.0, abs=1e-6)
    # the pure function: two planes at 30 degrees
    e = torch.eye(3, dtype=torch.float64)
    turned = torch.stack([e[0], math.cos(math.radians(30)) * e[1] + math.sin(math.radians(30)) * e[2]], 1)
    assert max_principal_angle(e[:, :2], turned) == pytest.approx(30.0, abs=1e-9)


def test_identical_matrices_give_no_shift_no_angle_and_full_overlap():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    out = weight_geometry(w, w.clone())
    assert out["spectral_shift"] == 0.0
    assert out["max_angle"] == pytest.approx(0.0, abs=1e-6)
    assert out["principal_mask_overlap"] == 1.0
    assert math.isnan(out["principal_update_share"])  # nothing moved: no updated entries


def test_principal_mask_and_the_update_share_of_a_rank_one_update():
    # W_0 = u v^T with u = v = (4, 3, 2, 1) is its own rank-1 reconstruction; |W_0| =
    #   16 12  8  4
    #   12  9  6  3
    #    8  6  4  2
    #    4  3  2  1      the top half (8 entries) is everything >= 6.
    u = torch.tensor([4.0, 3.0, 2.0, 1.0])
    base = torch.outer(u, u)
    expected = base >= 6
    assert torch.equal(principal_mask(base, rank=1, density=0.5), expected)
    # a rank-1 update of rows 0 and 3: (e_0 + e_3) 1^T, 8 moved entries; row 0 holds 3 principal weights
    # (16, 12, 8), row 3 none: share 3/8 (a random placement would give 0.5)
    delta = 0.5 * torch.outer(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.ones(4))
    assert principal_update_share(delta, expected, density=0.5) == pytest.approx(3 / 8)
    assert weight_geometry(base, base + delta, k=1, rank=1)["principal_update_share"] == pytest.approx(3 / 8)
    # when fewer than rho of the entries moved, only those count (zeros are never updates)
    one = torch.zeros(4, 4)
    one[0, 0] = 1e-3
    assert principal_update_share(one, expected, density=0.5) == 1.0
    assert mask_overlap(expected, torch.zeros(4, 4, dtype=torch.bool)) == 0.0


def test_top_fraction_keeps_ties_and_drops_zeros():
    values = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.0, 0.0])
    assert top_fraction(values, 0.3).tolist() == [True, True, True, False, False, False]  # ceil(1.8) = 2, tie kept
    assert top_fraction(values, 1.0).tolist() == [True, True, True, True, False, False]


def test_geometry_ranks():
    assert geometry_ranks((768, 2048)) == (96, 12)
    assert geometry_ranks((48, 96)) == (6, 1)
    assert geometry_ranks((2, 3)) == (1, 1)


def test_principal_drift_per_kind_with_a_cached_base():
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.embed_tokens.weight", "model.norm.weight"]
    base = {n: torch.randn(32, 16, generator=g) for n in names[:3]} | {names[3]: torch.ones(16)}
    current = {n: w + 0.01 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    cache: dict = {}
    out = principal_drift(base, current, cache=cache)
    assert sorted(cache) == sorted(names[:3])  # the 1-D norm is left out
    for kind, name in (("attention", names[0]), ("mlp", names[1]), ("embedding", names[2])):
        alone = weight_geometry(base[name], current[name])
        assert out[f"max_angle/{kind}"] == pytest.approx(alone["max_angle"])
        assert out[f"principal_update_share/{kind}"] == pytest.approx(alone["principal_update_share"])
    parts = [out[f"spectral_shift/{k}"] for k in ("attention", "mlp", "embedding")]
    assert out["spectral_shift"] == pytest.approx(sum(parts) / 3)  # each matrix counts once
    assert "spectral_shift/norm" not in out
    marker = cache[names[0]]
    assert principal_drift(base, current, cache=cache) == pytest.approx(out) and cache[names[0]] is marker


def test_report_has_a_per_module_type_geometry_table(tmp_path):
    import json

    from cptlab.report import write_report
    from helpers import make_run

    run = make_run(tmp_path / "r")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec["event"] == "drift":
            rec.update({"param/spectral_shift": 1e-4 * rec["stage"], "param/max_angle": 2.5,
                        "param/max_angle/attention": 3.25, "param/principal_mask_overlap": 0.99,
                        "param/principal_update_share": 0.4, "param/principal_update_share/mlp": 0.375})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = write_report(run).read_text()
    assert "Weight geometry per module type" in text
    for cell in ("1.00e-04", "2.00e-04", "2.50", "3.25", "99.0%", "40.0%", "37.5%"):
        assert f">{cell}<" in text, cell
