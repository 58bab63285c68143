"""benchmarks/bench_scale.py (bench_gpu_all's qwen3_1p7b and long_rollout sections): the bandwidth-bound
arithmetic on the real Qwen3-1.7B shape (meta tensors: no memory), the planted heavy-tailed lengths, and
both sections end to end at smoke size on the CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen3_1p7b_decode_bound_is_weights_plus_live_kv_bytes_over_bandwidth():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    b = _bench_scale()
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**b.QWEN3_1P7B, tie_word_embeddings=True, max_position_embeddings=512))
    params = sum(p.numel() for p in model.parameters())
    # 28 layers x (q 2048x2048 + k, v 2048x1024 + o 2048x2048 + MLP 3 x 2048x6144 + norms) + tied 49152x2048
    layer = 2048 * 2048 * 2 + 2048 * 1024 * 2 + 3 * 2048 * 6144 + 2 * 2048 + 2 * 128
    assert params == 28 * layer + 49152 * 2048 + 2048
    assert b.kv_bytes_per_token(model) == 28 * 8 * 128 * 2 * 2 == 114_688  # the "about 112 KB"
    bound = b.decode_bound(model, batch=256, prompt=64, new=128, bandwidth=3.0e12)
    # 128 steps: the weights once each, plus 256 rows x (64 + t) live tokens of KV at step t
    total = 128 * params * 2 + 256 * 114_688 * sum(64 + t for t in range(128))
    assert bound["bound_seconds"] == pytest.approx(total / 3.0e12)
    assert bound["bound_tokens_per_second"] == pytest.approx(256 * 128 / (total / 3.0e12))
    assert 110_000 < bound["bound_tokens_per_second"] < 116_000  # the "near 115k"
    assert 45_000 < b.decode_bound(model, 64, 64, 128, 3.0e12)["bound_tokens_per_second"] < 50_000  # "near 49k"


def test_planted_lengths_are_heavy_tailed_within_the_budget_with_rows_at_it():
    b = _bench_scale()
    lengths = b.heavy_tailed_lengths(256, 4096, median=256, sigma=1.2, at_budget=0.01)
    assert lengths.shape == (256,) and int(lengths.min()) >= 8 and int(lengths.max()) == 4096
    assert int((lengths == 4096).sum()) >= 3  # 1% of 256 rows (rounded), plus any the tail reaches
    assert 150 < float(lengths.median()) < 400  # most rows stop early
    assert float(lengths.sum()) < 0.25 * 256 * 4096  # so rows x budget overstates the work several times
    assert torch.equal(lengths, b.heavy_tailed_lengths(256, 4096, median=256, sigma=1.2, at_budget=0.01))  # seeded
    assert int((b.heavy_tailed_lengths(4, 64, median=4, sigma=1.0, at_budget=0.0) == 64).sum()) >= 1


@pytest.mark.slow
def test_bench_gpu_all_smoke_runs_the_scale_sections_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_all.py"), "--smoke", "--sections",
                           "qwen3_1p7b,long_rollout", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench_gpu_all.json").read_text())
    assert {r["section"]: r["status"] for r in result["runs"]} == {"qwen3_1p7b": ["ok"], "long_rollout": ["ok", "ok"]}
    s = result["summary"]
    rollout = {(r["batch"], r["engine"]): r for r in s["qwen3_1p7b"]["rollout"]}
    assert set(rollout) == {(4, "fast"), (4, "plain"), (8, "fast"), (8, "plain")}
    assert all(r["tokens_per_second"] > 0 and r["bound_tokens_per_second"] > 0 for r in rollout.values())
    assert s["qwen3_1p7b"]["grpo"]["rows"] == 4 and s["qwen3_1p7b"]["grpo"]["train_tokens_per_second"] > 0
    for model, rows in (("76m", 4), ("qwen3", 8)):
        x = s[f"long_rollout_{model}"]
        assert (x["rows"], x["budget"], x["rows_x_budget"]) == (rows, 64, rows * 64)
        assert x["rows_at_budget"] >= 1 and 0 < x["generated_fraction"] < 1
        assert x["kv_live_max_bytes"] < x["kv_allocated_bytes"]
    assert "Qwen3-1.7B shape" in proc.stdout and "long rollout qwen3" in proc.stdout
