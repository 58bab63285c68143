"""cptlab.analysis against hand-made inputs whose answers are worked out in the comments."""

import json
import math

import numpy as np
import pytest
import torch

from cptlab.analysis.artifacts import (
    artifact_stats, detect_collapse, distinct_n, longest_repeated_ngram, repetition_score, rollout_repetition,
    tokenize,
)
from cptlab.analysis.drift import (
    effective_rank, module_kind, parameter_drift, relative_l2, subspace_overlap, top_left_singular,
    update_spectrum, update_sparsity,
)
from cptlab.analysis.metrics import (
    average_accuracy, average_accuracy_trained, backward_transfer, forgetting, forward_transfer, in_domain_gain,
    matrix_from_records, mean_forgetting, ood_change, ood_columns,
)
from cptlab.analysis.response import answer_change_rate, response_drift, token_kl
from cptlab.analysis.summary import build_summary

# ----------------------------------------------------------------------------- metrics

# rows: base, after stage 1 (trains a), 2 (trains b), 3 (trains c); columns a, b, c
R = np.array([[0.2, 0.1, 0.3],
              [0.8, 0.2, 0.3],
              [0.6, 0.7, 0.4],
              [0.5, 0.4, 0.9]])
STAGES = [0, 1, 2]


def test_backward_and_forward_transfer():
    # BWT = mean(R[3,a] - R[1,a], R[3,b] - R[2,b]) = mean(0.5-0.8, 0.4-0.7) = -0.3
    assert backward_transfer(R, STAGES) == pytest.approx(-0.3)
    # FWT = mean(R[1,b] - R[0,b], R[2,c] - R[0,c]) = mean(0.2-0.1, 0.4-0.3) = 0.1
    assert forward_transfer(R, STAGES) == pytest.approx(0.1)


def test_forgetting_and_gains():
    # best earlier row minus final: a 0.8-0.5, b 0.7-0.4, c 0.4-0.9 (signed)
    np.testing.assert_allclose(forgetting(R), [0.3, 0.3, -0.5])
    assert mean_forgetting(R, STAGES) == pytest.approx(0.3)  # over a and b, trained before the last stage
    np.testing.assert_allclose(in_domain_gain(R, STAGES), [0.6, 0.5, 0.5])
    np.testing.assert_allclose(average_accuracy(R), [0.2, 1.3 / 3, 1.7 / 3, 0.6])
    np.testing.assert_allclose(average_accuracy(R, columns=[0, 2]), [0.25, 0.55, 0.5, 0.7])
    # over the domains trained so far: after 1 a; after 2 a, b; after 3 a, b, c
    np.testing.assert_allclose(average_accuracy_trained(R, STAGES), [np.nan, 0.8, 0.65, 1.8 / 3])


def test_forgetting_takes_rows_after_training_unless_the_base_row_is_asked_for():
    # domain b is best at the base (0.9), then 0.2 and 0.7 after stages 1 and 2, 0.4 at the end
    Rb = np.array([[0.2, 0.9, 0.3],
                   [0.8, 0.2, 0.3],
                   [0.6, 0.7, 0.4],
                   [0.5, 0.4, 0.9]])
    # Chaudhry et al.: max over rows 1..S-1 -> a 0.8-0.5, b 0.7-0.4, c 0.4-0.9
    np.testing.assert_allclose(forgetting(Rb), [0.3, 0.3, -0.5])
    # base row included: b 0.9-0.4 = 0.5, c max(0.3, 0.3, 0.4) - 0.9
    np.testing.assert_allclose(forgetting(Rb, include_base=True), [0.3, 0.5, -0.5])
    assert mean_forgetting(Rb, STAGES) == pytest.approx(0.3)
    assert mean_forgetting(Rb, STAGES, include_base=True) == pytest.approx(0.4)
    # one stage: no row after training before the last, so no Chaudhry forgetting; with the base row,
    # a domain that fell from 0.9 to 0.2 counts 0.7
    assert np.isnan(forgetting(Rb[:2])).all()
    np.testing.assert_allclose(forgetting(Rb[:2], include_base=True), [-0.6, 0.7, 0.0])


def test_single_stage_and_missing_values():
    R1 = R[:2]
    assert math.isnan(backward_transfer(R1, [0]))
    assert math.isnan(forward_transfer(R1, [0]))
    assert math.isnan(mean_forgetting(R1, [0]))
    assert np.isnan(forgetting(R[:1])).all()
    R_gap = R.copy()
    R_gap[2, 1] = np.nan  # b not evaluated after stage 2: BWT keeps only stage 1's term
    assert backward_transfer(R_gap, STAGES) == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="stage_domains"):
        backward_transfer(R, [0, 1])


def test_ood_change():
    domains = ["sorting", "sorting_ood", "gcd"]
    cols = ood_columns(domains)
    assert cols == [1, None, None]
    M = np.array([[0.1, 0.2, 0.5], [0.6, 0.35, 0.4], [0.5, 0.3, 0.9]])
    out = ood_change(M, [0, 2], cols)
    assert out[0] == pytest.approx(0.15) and math.isnan(out[1])


# ----------------------------------------------------------------------------- drift


def test_module_kind():
    assert module_kind("model.layers.3.self_attn.k_proj.weight") == "attention"
    assert module_kind("model.layers.3.self_attn.q_norm.weight") == "norm"
    assert module_kind("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_kind("model.embed_tokens.weight") == "embedding"
    assert module_kind("lm_head.weight") == "embedding"
    assert module_kind("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert module_kind("model.norm.weight") == "norm"
    assert module_kind("score.weight") == "other"


def test_relative_l2():
    ref = {"w": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([0.0])}  # ||ref|| = 3
    cur = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0])}  # ||cur - ref|| = 1
    assert relative_l2(cur, ref) == pytest.approx(1 / 3)
    assert relative_l2(cur, ref, ["b"]) != relative_l2(cur, ref, ["b"])  # 0/0 -> nan


def _orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, :k]


def test_effective_rank():
    U, V = _orthonormal(16, 3, 0), _orthonormal(12, 3, 1)
    assert effective_rank(U @ V.T) == pytest.approx(3.0, abs=1e-6)  # 3 equal singular values
    # singular values (2, 1): p = (2/3, 1/3), exp(H) = 3 / 2^(2/3) = 1.88988
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 0.0]))) == pytest.approx(1.889882, abs=1e-5)
    assert effective_rank(torch.zeros(4, 4)) == 0.0


def test_update_sparsity():
    delta = torch.tensor([0.0, 1e-5, 0.5, -1.0])  # threshold 1e-3 * 1.0: two entries unchanged
    assert update_sparsity(delta) == pytest.approx(0.5)
    assert update_sparsity(delta, tol=0.6) == pytest.approx(0.75)
    assert update_sparsity(torch.zeros(3)) == 1.0


def test_subspace_overlap():
    base = torch.diag(torch.cat([torch.arange(10.0, 2.0, -1.0), torch.full((24,), 0.1)]))  # top-8: e_0..e_7
    x, y = torch.randn(32), torch.randn(32)
    e = torch.eye(32)
    inside = torch.outer(e[1], x) + torch.outer(e[5], y)
    assert subspace_overlap(inside, base, k=8) == pytest.approx(1.0, abs=1e-5)
    outside = torch.outer(e[20], x) + torch.outer(e[30], y)
    assert subspace_overlap(outside, base, k=8) == pytest.approx(0.0, abs=1e-6)
    half = torch.outer(e[0] + e[20], x)  # direction at 45 degrees to the subspace: cos^2 = 1/2
    assert subspace_overlap(half, base, k=8) == pytest.approx(0.5, abs=1e-5)


def test_parameter_drift_hand_numbers_and_tied_weights():
    emb = torch.ones(4, 3)
    base = {"model.embed_tokens.weight": emb, "lm_head.weight": emb,
            "model.layers.0.self_attn.q_proj.weight": torch.eye(3) * 2.0,   # norm sqrt(12)
            "model.norm.weight": torch.tensor([1.0, 2.0, 2.0])}             # norm 3
    cur = {k: v.clone() for k, v in base.items()}
    cur["lm_head.weight"] = cur["model.embed_tokens.weight"]  # tied: one tensor, listed twice
    cur["model.layers.0.self_attn.q_proj.weight"][0, 1] = 3.0  # one entry moves by 3
    cur["model.norm.weight"] = torch.tensor([1.0, 2.0, 3.0])    # one entry moves by 1
    out = parameter_drift(base, cur, previous=base)
    assert out["num_tensors"] == 3.0
    # ||delta|| = sqrt(9 + 1); ||base|| = sqrt(12 + 12 + 9) (embedding counted once)
    assert out["rel_l2_base"] == pytest.approx(math.sqrt(10 / 33))
    assert out["rel_l2_prev"] == pytest.approx(math.sqrt(10 / 33))
    assert out["rel_l2_base/attention"] == pytest.approx(3 / math.sqrt(12))
    assert out["rel_l2_base/norm"] == pytest.approx(1 / 3)
    assert out["rel_l2_base/embedding"] == 0.0
    assert out["update_norm"] == pytest.approx(math.sqrt(10))
    # unchanged entries: 12 (embedding) + 8 (q_proj) + 2 (norm) of 24
    assert out["sparsity"] == pytest.approx(22 / 24)
    assert out["effective_rank"] == pytest.approx(1.0)  # a single-entry update is rank 1
    # q_proj base = 2I: every direction is principal, the rank-1 update lies inside its top-3
    assert out["subspace_overlap"] == pytest.approx(1.0, abs=1e-6)
    saved = {k: v.clone() for k, v in cur.items()}  # a safetensors round trip unties the storage
    assert parameter_drift(base, saved)["num_tensors"] == 3.0


def test_update_spectrum_matches_the_separate_measures_and_the_base_cache_is_reused():
    g = torch.Generator().manual_seed(0)
    base_w = torch.randn(24, 16, generator=g)
    delta = torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)  # rank 3
    rank, overlap = update_spectrum(delta, top_left_singular(base_w, 8), 8)
    assert rank == pytest.approx(effective_rank(delta), rel=1e-5)
    assert overlap == pytest.approx(subspace_overlap(delta, base_w, 8), rel=1e-5)
    assert all(math.isnan(v) for v in update_spectrum(torch.zeros(24, 16), top_left_singular(base_w), 8))

    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    base = {n: torch.randn(24, 16, generator=g) for n in names}
    cur = {n: w + 0.1 * torch.randn(24, 16, generator=g) for n, w in base.items()}
    cache: dict = {}
    first = parameter_drift(base, cur, base_subspaces=cache)
    assert sorted(cache) == sorted(names) and cache[names[0]]["u"].shape == (24, 8)  # max(top_k, 16 / 8)
    assert torch.allclose(cache[names[0]]["u"].abs(), top_left_singular(base[names[0]], 8).abs(), atol=1e-8)
    cache[names[0]] = dict(cache[names[0]])
    marker = cache[names[0]]
    again = parameter_drift(base, cur, base_subspaces=cache)
    assert cache[names[0]] is marker  # not recomputed
    assert again == pytest.approx(first)


# ----------------------------------------------------------------------------- response drift


def test_token_kl_and_answer_change():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")]])
    base = torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert token_kl(lp, base, mask) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert answer_change_rate(["1", "2", None, None], ["1 ", "3", None, "4"]) == pytest.approx(0.5)


def test_response_drift_of_a_model_against_itself():
    from cptlab.config import ModelConfig
    from cptlab.models import build_tiny_model, build_tokenizer
    from cptlab.rollout import SamplingSpec

    tok = build_tokenizer()
    m = build_tiny_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), tok)
    prompts = ["Q: 3+4\nA:", "Q: sort 3 1 2\nA:", "Q: gcd 6 4\nA:"]
    out = response_drift(m, m, tok, prompts, SamplingSpec(max_new_tokens=6, batch_size=2), seed=0)
    assert out["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert out["kl_to_base_k3"] == pytest.approx(0.0, abs=1e-6)
    assert out["answer_changed_frac"] == 0.0
    assert out["mean_length"] == out["base_mean_length"] > 0
    assert out["entropy"] > 0 and 0 < out["sampled_mean_length"] <= 6


# ----------------------------------------------------------------------------- artifacts


def test_tag_rates():
    texts = ["1+2=3 <answer>3</answer>",                  # well formed
             "<answer>2</answer><answer>2</answer>",      # planted repeated tag
             "<answer>3",                                 # unbalanced, no answer
             "<answer>4</answer> trailing"]               # not at the end
    out = artifact_stats(texts)
    assert out["multiple_answer_rate"] == 0.25
    assert out["unclosed_answer_rate"] == 0.25
    assert out["text_after_answer_rate"] == 0.25
    assert out["malformed_rate"] == 0.75
    assert out["no_answer_rate"] == 0.25
    assert out["empty_answer_rate"] == out["placeholder_answer_rate"] == 0.0
    assert out["char_level"] == 1.0
    assert tokenize("<answer>7</answer>", "char") == ["<answer>", "7", "</answer>"]


def test_boxed_artifact_rates_read_the_boxed_format():
    texts = ["2 + 3 = 5, so \\boxed{5}.",               # well formed (closing punctuation allowed)
             "\\boxed{4} or \\boxed{5}",                 # two boxes
             "The answer is \\boxed{ANSWER}",             # placeholder copied from the instruction
             "\\boxed{} 5",                              # empty box, text after it
             "\\boxed{5} because five is",               # text after the box
             "so \\boxed{5"]                            # never closed
    out = artifact_stats(texts, answer_format="boxed")
    assert out["malformed_rate"] == 5 / 6
    assert out["no_answer_rate"] == 3 / 6  # placeholder, empty, unclosed
    assert out["multiple_answer_rate"] == 1 / 6
    assert out["placeholder_answer_rate"] == 1 / 6
    assert out["empty_answer_rate"] == 1 / 6
    assert out["text_after_answer_rate"] == 2 / 6  # ' 5' and ' because five is'; '.' may close a box
    assert out["unclosed_answer_rate"] == 1 / 6
    assert artifact_stats(texts)["malformed_rate"] == 1.0  # read as tags, nothing is an answer
    assert tokenize("\\boxed{7}", "char") == ["\\boxed{", "7", "}"]


def test_distinct_and_repetition():
    tokens = tokenize("a b a b", "word")
    # unigrams a b a b: 2/4; bigrams ab ba ab: 2/3; trigrams aba bab: 2/2
    assert distinct_n([tokens], 1) == 0.5
    assert distinct_n([tokens], 2) == pytest.approx(2 / 3)
    assert distinct_n([tokens], 3) == 1.0
    assert longest_repeated_ngram(tokens) == 2
    assert longest_repeated_ngram(list("aaaa")) == 3  # overlapping occurrences count
    assert longest_repeated_ngram(list("abc")) == 0
    assert repetition_score(tokens, 2) == pytest.approx(1 / 3)
    out = artifact_stats(["abab", "abcd"])  # char level: distinct-1 = 4 unique / 8
    assert out["distinct_1"] == 0.5 and out["longest_repeated_ngram"] == 1.0
    assert out["repetition_rate"] == 0.0  # rep-4 of a 4-char text: a single 4-gram


def test_detect_collapse():
    steps = list(range(100, 120))
    acc = [0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.78, 0.8, 0.79, 0.8, 0.8, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    ent = [1.0] * 12 + [0.3] * 8
    flag = detect_collapse(steps, acc, ent)
    assert flag["step"] == 112 and flag["peak"] == 0.8 and flag["signals"] == ["entropy_drop"]
    assert detect_collapse(steps, acc, [1.0] * 20) is None          # accuracy fell, entropy did not
    assert detect_collapse(steps, acc)["signals"] == ["accuracy"]   # no second signal to ask
    rep = [0.0] * 14 + [0.5] * 6
    assert detect_collapse(steps, acc, repetition=rep)["step"] == 114
    healthy = [0.7 + 0.05 * (-1) ** i for i in range(20)]
    assert detect_collapse(steps, healthy, [1.0 - 0.015 * i for i in range(20)]) is None
    assert detect_collapse(steps, [0.05, 0.0] * 10, [1.0, 0.1] * 10) is None  # peak below min_peak


# ----------------------------------------------------------------------------- summary

DOMAINS = ["sorting", "sorting_ood", "arithmetic"]
ACC = [[0.20, 0.10, 0.50], [0.51, 0.20, 0.32], [0.40, 0.15, 0.60]]


def _records(n_stages_done: int, with_end: bool) -> list[dict]:
    recs = [{"event": "run_start", "name": "t", "base": {"source": "built"}, "domains": DOMAINS,
             "stages": [{"domain": "sorting", "steps": 20, "method": "grpo"},
                        {"domain": "arithmetic", "steps": 20, "method": "sdpo"}]}]
    for s in range(n_stages_done + 1):
        for d, a in zip(DOMAINS, ACC[s]):
            name = "base" if s == 0 else recs[0]["stages"][s - 1]["domain"]
            recs.append({"event": "eval", "stage": s, "stage_name": name,
                         "step": 20 * (s > 0), "global_step": 20 * s, "final": True, "domain": d,
                         "greedy_acc": a, "sampled_acc": a / 2, "format_rate": 1.0, "mean_length": 9.0})
        if s >= 1:
            recs.append({"event": "eval", "stage": s, "stage_name": "x", "step": 10, "global_step": 20 * s - 10,
                         "final": False, "domain": "sorting", "greedy_acc": 0.99, "sampled_acc": 0.9})
            acc = [0.3, 0.5, 0.7, 0.8] + [0.8] * 16 if s == 1 else [0.3, 0.5, 0.7, 0.8] + [0.8] * 6 + [0.0] * 10
            ent = [1.0] * 20 if s == 1 else [1.0] * 10 + [0.1] * 10
            for i in range(20):
                recs.append({"event": "train", "stage": s, "domain": "x", "method": "grpo", "step": i + 1,
                             "global_step": 20 * (s - 1) + i + 1, "reward": acc[i], "accuracy": acc[i],
                             "entropy": ent[i]})
            recs.append({"event": "drift", "stage": s, "global_step": 20 * s, "param/rel_l2_base": 0.01 * s,
                         "response/kl_to_base": float("nan")})
    if with_end:
        recs.append({"event": "run_end", "seconds": 12.5})
    return recs


def test_build_summary_full_run():
    out = build_summary(_records(2, with_end=True))
    json.dumps(out, allow_nan=False)
    assert out["complete"] and out["stages_completed"] == 2 and out["domains"] == DOMAINS
    assert out["stage_names"] == ["base", "sorting", "arithmetic"]
    assert out["accuracy_matrix"] == ACC
    assert out["accuracy_matrix_sampled"][1][0] == pytest.approx(0.255)
    assert out["bwt"] == pytest.approx(0.40 - 0.51)     # sorting after stage 2 vs after stage 1
    assert out["fwt"] == pytest.approx(0.32 - 0.50)     # arithmetic before its stage vs base
    # Chaudhry: the row after stage 1 minus the final row; with the base row too, arithmetic's 0.50
    assert out["forgetting"] == pytest.approx({"sorting": 0.11, "sorting_ood": 0.05, "arithmetic": -0.28})
    assert out["forgetting_incl_base"] == pytest.approx({"sorting": 0.11, "sorting_ood": 0.05, "arithmetic": -0.10})
    assert out["mean_forgetting"] == pytest.approx(0.11) and out["mean_forgetting_incl_base"] == pytest.approx(0.11)
    assert out["average_accuracy_trained"][0] is None
    assert out["average_accuracy_trained"][1:] == pytest.approx([0.51, 0.50])  # sorting; sorting and arithmetic
    assert out["metrics_version"] == 2
    assert out["in_domain_gain"] == pytest.approx([0.31, 0.28])
    assert out["ood_change"][0] == pytest.approx(0.10) and out["ood_change"][1] is None
    assert out["worst_drop"][0]["domain"] == "arithmetic"
    assert out["drift"][1]["param/rel_l2_base"] == 0.02 and out["drift"][1]["response/kl_to_base"] is None
    assert out["collapse"][0] is None and out["collapse"][1]["step"] == 32  # window 2: 2nd zero step
    assert out["headline"][1] == "Stage 1: GRPO gained 31 points on sorting (OOD +10) and lost 18 on arithmetic."
    assert out["headline"][2] == "Stage 2: SDPO gained 28 points on arithmetic and lost 11 on sorting."
    assert "collapsed at step 32" in out["headline"][3]
    assert not any("incomplete" in h for h in out["headline"])


def test_build_summary_partial_runs():
    base_only = build_summary(_records(0, with_end=False)[:4])
    json.dumps(base_only, allow_nan=False)
    assert base_only["accuracy_matrix"] == [ACC[0]] and base_only["bwt"] is None
    assert base_only["in_domain_gain"] == [None, None] and base_only["drift"] == [None, None]
    assert base_only["headline"][-1] == "Run incomplete: 0 of 2 stages finished."
    crashed = _records(1, with_end=False) + [{"event": "train", "stage": 2, "step": 1, "global_step": 21,
                                              "reward": 0.5, "entropy": 1.0},
                                             {"event": "fault", "stage": 2, "action": "stopped", "reason": "nan loss"}]
    out = build_summary(crashed)
    json.dumps(out, allow_nan=False)
    assert out["stages_completed"] == 1 and out["in_domain_gain"][1] is None and out["fwt"] is None
    assert "fault: nan loss" in out["headline"][-1]
    empty = build_summary([])
    assert empty["accuracy_matrix"] == [] and empty["headline"][0] == "No evaluation recorded yet."


def test_matrix_from_records_gap():
    recs = [r for r in _records(2, with_end=True) if not (r["event"] == "eval" and r["stage"] == 1)]
    R_, domains, stage_domains = matrix_from_records(recs)
    assert R_.shape == (3, 3) and np.isnan(R_[1]).all() and stage_domains == [0, 2]


def test_rollout_repetition_per_step():
    # "abababab" in characters: 4-grams abab, baba, abab, baba, abab -> rep-4 = 1 - 2/5; bigrams: 7, 2 distinct
    # "abcde": 2 distinct 4-grams of 2, rep 0; bigrams ab bc cd de. Corpus distinct-2: {ab, ba, bc, cd, de}
    # (ab is in both) over 7 + 4 bigrams
    out = rollout_repetition(["abababab", "abcde"])
    assert out["rollout/repetition_rate"] == pytest.approx((0.6 + 0.0) / 2)
    assert out["rollout/distinct_2"] == pytest.approx(5 / 11)
    assert all(math.isnan(v) for v in rollout_repetition([]).values())
