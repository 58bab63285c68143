"""The batched drift record (analysis/drift_record.py, analysis/spectra.py): the same numbers as the
per-matrix reference implementation it replaced (tests/drift_reference.py), hand numbers on a 3 x 2
matrix, LoRA updates from their factors equal to the materialised ones, and the base cache on disk."""

from __future__ import annotations

import math

import pytest
import torch

import drift_reference as REF
from cptlab.analysis.drift import parameter_drift, principal_drift
from cptlab.analysis.drift_record import weight_drift
from cptlab.analysis.spectra import (BaseSpectra, LowRank, gram_spectra, lowrank_frobenius_sq, lowrank_spectrum)
from cptlab.config import ModelConfig
from cptlab.models import build_tiny_model, build_tokenizer


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_tiny_model(cfg, build_tokenizer(), seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def moved(state, scale: float, seed: int, low_rank: int | None = None):
    """Every tensor moved by scale * its mean magnitude; 2-D ones by a rank-`low_rank` update if given."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if low_rank and v.dim() == 2:
            step = torch.randn(v.shape[0], low_rank, generator=g) @ torch.randn(low_rank, v.shape[1], generator=g)
        else:
            step = torch.randn(v.shape, generator=g)
        out[k] = v + scale * v.abs().mean() * step / step.abs().mean()
    return out


def reference_record(base, current, previous=None):
    out = REF.parameter_drift(base, current, previous)
    out.update(REF.principal_drift(base, current))
    return out


def assert_same_record(new: dict, old: dict, rel: float = 1e-6, abs_: float = 1e-9, angle_abs: float = 1e-4):
    assert sorted(new) == sorted(old)
    for key, value in old.items():
        if math.isnan(value):
            assert math.isnan(new[key]), key
        elif key.startswith("max_angle"):  # degrees
            assert new[key] == pytest.approx(value, abs=angle_abs), key
        else:
            assert new[key] == pytest.approx(value, rel=rel, abs=abs_), key


@pytest.mark.parametrize("low_rank", [None, 2])
def test_the_record_equals_the_reference_implementation_on_a_tiny_model(low_rank):
    base = tiny_state()
    current = moved(base, 1e-2, seed=1, low_rank=low_rank)
    previous = moved(base, 5e-3, seed=2)
    cache = BaseSpectra()
    new = weight_drift(base, current, previous, cache=cache)
    assert_same_record(new, reference_record(base, current, previous))
    # small batches (one matrix each) and the separate public functions give the same record
    again = weight_drift(base, current, previous, cache=cache, batch_bytes=1)
    assert_same_record(again, new, rel=1e-9, abs_=1e-12, angle_abs=1e-9)
    split = parameter_drift(base, current, previous, base_subspaces=cache)
    split.update(principal_drift(base, current, cache=cache))
    assert split == pytest.approx(new, nan_ok=True)


def test_grams_accumulated_in_pieces_give_the_same_record(monkeypatch):
    import cptlab.analysis.spectra as S

    base = tiny_state()
    current = moved(base, 1e-2, seed=1)
    whole = weight_drift(base, current)
    monkeypatch.setattr(S, "CHUNK_BYTES", 4096)  # a few rows or columns per piece
    assert_same_record(weight_drift(base, current), whole, rel=1e-9, abs_=1e-12, angle_abs=1e-9)


def test_the_stage_zero_record_needs_no_update_spectra_and_equals_the_reference():
    base = tiny_state()
    current = {k: v.clone() for k, v in base.items()}  # the stage-0 record: nothing moved yet
    new = weight_drift(base, current)
    assert_same_record(new, reference_record(base, current))
    assert new["spectral_shift"] == 0.0 and new["principal_mask_overlap"] == 1.0
    assert math.isnan(new["effective_rank"]) and math.isnan(new["principal_update_share"])


def test_hand_numbers_on_a_three_by_two_matrix():
    # W_0 = [[3, 0], [0, 4], [0, 0]]: sigma (4, 3), top left vector e_2. W_t adds 1 at (3, 2):
    # columns (3, 0, 0) and (0, 4, 1) are orthogonal, so sigma(W_t) = (sqrt 17, 3), top vector (0, 4, 1)/sqrt 17.
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    wt = w0.clone()
    wt[2, 1] = 1.0
    out = weight_drift({name: w0}, {name: wt})
    assert out["rel_l2_base"] == pytest.approx(1 / 5)  # ||delta|| = 1, ||W_0|| = 5
    assert out["update_norm"] == pytest.approx(1.0)
    assert out["sparsity"] == pytest.approx(5 / 6)
    assert out["effective_rank"] == pytest.approx(1.0)
    assert out["subspace_overlap"] == pytest.approx(0.0, abs=1e-12)  # e_3 is orthogonal to span(e_1, e_2)
    assert out["spectral_shift"] == pytest.approx((math.sqrt(17) - 4) / 5)
    # k = max(1, round(2 / 8)) = 1: the angle between e_2 and (0, 4, 1) / sqrt 17 is atan(1 / 4)
    assert out["max_angle"] == pytest.approx(math.degrees(math.atan(1 / 4)), abs=1e-9)
    # r = 1: U_r U_r^T W_0 has one non-zero entry (2, 2) = M_0; the top half of |U_r U_r^T W_t| holds
    # (2, 2) and (3, 2) (the zeros never count): |M_0 & M_t| / |M_0| = 1. The one moved entry (3, 2) is
    # not in M_0: update share 0.
    assert out["principal_mask_overlap"] == 1.0
    assert out["principal_update_share"] == 0.0


def test_float32_grams_would_drown_a_low_rank_update_in_noise():
    """Why the spectra stay float64 (spectra.py): a rank-2 update's effective rank through a float32
    Gram picks up the noise floor sqrt(eps32) * sigma_max on each of the zero singular values."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(256, 2, generator=g) @ torch.randn(2, 384, generator=g)
    exact = REF._rank_from_singular_values(torch.linalg.svdvals(delta.double()))
    s64, _ = gram_spectra(delta.unsqueeze(0), 1)
    assert REF._rank_from_singular_values(s64[0]) == pytest.approx(exact, rel=1e-5)
    assert float(s64[0, 2] / s64[0, 0]) < 1e-7  # float64 floor: sqrt(eps64) = 1.5e-8
    s32 = torch.linalg.eigvalsh(delta @ delta.T).flip(0).clamp_min(0).sqrt()
    assert float(s32[2] / s32[0]) > 1e-4  # float32 floor: sqrt(eps32) = 3.5e-4
    assert REF._rank_from_singular_values(s32) > 1.05 * exact  # 2.11 for 2.00


def test_low_rank_factors_give_the_norm_and_spectrum_of_their_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(3, 24, generator=g, dtype=torch.float64)
    product = b @ a
    assert float(lowrank_frobenius_sq(b, a)) == pytest.approx(float(product.pow(2).sum()), rel=1e-12)
    s, u = lowrank_spectrum(b, a, 2)
    full_u, full_s, _ = torch.linalg.svd(product)
    assert torch.allclose(s, full_s[:3], rtol=1e-10)
    assert torch.allclose((u.T @ full_u[:, :2]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_lora_updates_from_factors_equal_the_materialised_computation():
    pytest.importorskip("peft")
    from cptlab.config import LoraConfig
    from cptlab.lora import apply_lora, lowrank_updates, merged_state_dict
    from cptlab.variants import drift_state

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_tiny_model(cfg, build_tokenizer(), seed=0).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = drift_state(model, base)  # a full model's: a float32 copy, never the live tensors
    assert all(full[k].dtype == torch.float32 and full[k].data_ptr() != p.data_ptr()
               and torch.equal(full[k], p.float()) for k, p in model.state_dict().items())
    model = apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    g = torch.Generator().manual_seed(3)

    def train():  # B starts at zero: give every adapter a non-zero update
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))

    train()
    previous = drift_state(model, base)
    previous_dense = {k: v.detach().clone() for k, v in merged_state_dict(model).items()}
    train()
    current = drift_state(model, base)
    current_dense = {k: v.detach().clone() for k, v in merged_state_dict(model).items()}
    updates = lowrank_updates(model)
    assert sorted(updates) == sorted(k for k in base if k.endswith("weight")
                                     and any(t in k for t in ("q_proj", "v_proj", "down_proj")))
    for name, update in updates.items():  # the factors are peft's own update
        assert torch.allclose(base[name] + update.dense(torch.float64), current_dense[name], rtol=0, atol=1e-14)
    assert all(current[k] is base[k] for k in base if k not in updates)  # frozen weights are not copied
    low = weight_drift(base, current, previous)
    dense = weight_drift(base, current_dense, previous_dense)
    # rel 1e-6: the dense Gram route reads the 28 zero singular values of each rank-4 update as ~1e-8 of
    # the largest (its float64 floor), which moves the effective rank by ~4e-7; the factors give exact zeros
    assert_same_record(low, dense, rel=1e-6, abs_=1e-12, angle_abs=1e-8)
    assert_same_record(low, reference_record(base, current_dense, previous_dense), rel=1e-6, abs_=1e-12,
                       angle_abs=1e-8)
    assert low["effective_rank"] <= 4.0 + 1e-9  # a rank-4 update, read from its 4 x 4 core


def test_the_base_cache_saves_atomically_and_loads_only_matching_entries(tmp_path):
    base = tiny_state()
    current = moved(base, 1e-2, seed=1)
    cache = BaseSpectra()
    first = weight_drift(base, current, cache=cache)
    assert cache.unsaved
    path = tmp_path / "run" / "drift_base.safetensors"
    cache.save(path)
    assert not cache.unsaved and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    loaded = BaseSpectra.load(path, base)
    assert sorted(loaded) == sorted(cache)
    for name, entry in cache.items():
        assert torch.equal(loaded[name]["u"], entry["u"]) and torch.equal(loaded[name]["mask"], entry["mask"])
    marker = {n: loaded[n]["u"] for n in loaded}
    assert weight_drift(base, current, cache=loaded) == pytest.approx(first, nan_ok=True)
    assert all(loaded[n]["u"] is marker[n] for n in loaded) and not loaded.unsaved  # not recomputed
    other = tiny_state(seed=5)  # another base: every entry is refused
    assert BaseSpectra.load(path, other) == {}
    assert BaseSpectra.load(tmp_path / "missing.safetensors", base) == {}
    path.write_bytes(b"torn")
    assert BaseSpectra.load(path, base) == {}


def test_low_rank_entries_of_a_wide_matrix_in_a_batch():
    """Two same-shaped LowRank updates in one batch, one of them zero (B = 0 at the start of LoRA)."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    base = {n: torch.randn(12, 20, generator=g) for n in names}
    updates = {names[0]: LowRank(torch.randn(12, 2, generator=g), torch.randn(2, 20, generator=g)),
               names[1]: LowRank(torch.zeros(12, 2), torch.randn(2, 20, generator=g))}
    dense = {n: base[n] + updates[n].dense() for n in names}
    low = weight_drift(base, updates)
    assert_same_record(low, reference_record(base, dense), rel=1e-5, abs_=1e-7, angle_abs=1e-3)
    assert low["num_tensors"] == 2.0


@pytest.mark.slow
def test_the_scale_benchmark_runs_and_the_two_paths_agree(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "drift_scale.py"
    out = tmp_path / "drift.json"
    subprocess.run([sys.executable, str(script), "--smoke", "--shrink", "16", "--out", str(out)], check=True,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["old_later_s"] > 0 and result["new_later_s"] > 0
    assert result["largest_difference"][1] < 1e-5  # relative (degrees for an angle)


def test_lowrank_updates_of_a_fan_in_fan_out_layer_are_transposed():
    """GPT-2's Conv1D stores its weight [in, out]: peft's update is (B A)^T there."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    from cptlab.lora import lowrank_updates, merged_state_dict

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                         fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()
    updates = lowrank_updates(wrapped)
    merged = merged_state_dict(wrapped)
    assert list(updates) == ["transformer.h.0.attn.c_attn.weight"]
    name, update = next(iter(updates.items()))
    assert update.shape == tuple(base[name].shape) == (16, 48)
    assert torch.allclose(base[name] + update.dense(), merged[name], atol=1e-6)
