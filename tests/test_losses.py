"""cptlab.losses against numbers computed by hand (in the comments) or from first principles."""

import math

import pytest
import torch

from cptlab.losses import (
    DIVERGENCES,
    POLICY_LOSSES,
    gather_logprobs,
    generalized_jsd,
    group_advantages,
    grouped_advantages,
    loss_units,
    grpo_loss,
    k3_kl,
    masked_mean,
    sdpo_loss,
    sdpo_token_loss,
    sft_loss,
    token_entropy,
)

ln = math.log


def logits_of(probs):
    """Logits whose softmax is `probs` (nested lists, last dim = vocabulary)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def kl_by_hand(p, q):
    return sum(pi * ln(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# ------------------------------------------------------------------------------------ helpers


def test_masked_mean_ignores_padding_even_nan():
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 3 + 5) / 3)
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([2.0, 5.0])
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_gather_logprobs_matches_log_softmax_and_upcasts_half():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    tokens = torch.randint(0, 7, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, tokens), expected, atol=1e-6)
    half = gather_logprobs(logits.bfloat16(), tokens)
    assert half.dtype == torch.float32 and torch.allclose(half, expected, atol=5e-2)
    # log softmax([0, ln 3])[1] = ln(3/4)
    assert gather_logprobs(torch.tensor([[[0.0, ln(3)]]]), torch.tensor([[1]])).item() == pytest.approx(ln(0.75))


def test_token_entropy_uniform_and_peaked():
    assert token_entropy(torch.zeros(2, 5)).tolist() == pytest.approx([ln(5)] * 2)
    # p = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; a -inf logit contributes 0
    peaked = torch.tensor([[ln(0.5), ln(0.25), ln(0.25), float("-inf")]])
    assert token_entropy(peaked).item() == pytest.approx(1.5 * ln(2), abs=1e-6)


def test_k3_kl_value():
    # lp = ln .5, ref = ln .25: exp(ref - lp) - (ref - lp) - 1 = 0.5 + ln 2 - 1
    value = k3_kl(torch.tensor([ln(0.5)]), torch.tensor([ln(0.25)]))
    assert value.item() == pytest.approx(0.5 + ln(2) - 1, abs=1e-6)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


# ------------------------------------------------------------------------------------ GRPO


def test_group_advantages_scaled_and_centered():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2 has no spread
    std = math.sqrt(1 / 3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert group_advantages(rewards, 1).tolist() == [0.0] * 8


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(7), 4)


def test_grouped_advantages_keyed_by_group_id_match_contiguous_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # interleaved: group 0 = rows 0, 2, 4, 6
    # group 0 rewards (1, 0, 1, 1): mean 0.75, unbiased std 0.5; group 1 (0, 1, 1, 0): mean 0.5, std sqrt(1/3)
    adv = grouped_advantages(rewards, ids, eps=0.0)
    assert adv[[0, 2, 4, 6]].tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5])
    s1 = math.sqrt(1 / 3)
    assert adv[[1, 3, 5, 7]].tolist() == pytest.approx([-0.5 / s1, 0.5 / s1, 0.5 / s1, -0.5 / s1])
    with pytest.raises(ValueError, match="same size"):
        grouped_advantages(torch.zeros(3), torch.tensor([0, 0, 1]))


def ragged_batch():
    """Two sequences, hand-picked ratios rho = exp(lp - old_lp).

    seq 0, A = +1, mask 1 1 1, rho = 1.0, 1.5, 0.5 -> token losses -1, -1.2 (clipped), -0.5
    seq 1, A = -2, mask 1 1 0, rho = 1.1, 0.7, 2.0 -> token losses 2.2, 1.6 (clipped), (masked)
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.0]], dtype=torch.float64)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]], dtype=torch.float64)
    logprobs = (old + ratios.log()).requires_grad_(True)
    return logprobs, old, torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", ((-1 - 1.2 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2),  # 0.5
        ("bnpo", (-1 - 1.2 - 0.5 + 2.2 + 1.6) / 5),  # 0.22
        ("dr_grpo", (-1 - 1.2 - 0.5 + 2.2 + 1.6) / (2 * 8)),  # 0.06875: B * max_completion_length = 2 * 8
    ],
)
def test_grpo_loss_each_loss_type_on_ragged_mask(loss_type, expected):
    logprobs, old, adv, mask = ragged_batch()
    loss, stats = grpo_loss(logprobs, old, adv, mask, loss_type=loss_type, max_completion_length=8)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["clip_fraction_high"] == pytest.approx(1 / 5)
    assert stats["clip_fraction_low"] == pytest.approx(1 / 5)
    assert stats["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 0.7) / 5)
    assert stats["advantage_mean"] == pytest.approx(-0.5) and stats["advantage_std"] == pytest.approx(1.5)
    assert set(POLICY_LOSSES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "gspo"}


def test_dr_grpo_normaliser_is_the_completion_budget_not_the_padded_width():
    """The bug: dr_grpo divided by the batch's padded width (mask.numel()), so the same 3-token sequence
    got a per-token gradient of -1/(2*3) next to a 3-token sibling and -1/(2*40) next to a 40-token one.
    Now it is sum / (B * L_max) with L_max the run's budget, whatever the batch's width."""
    grads = []
    for width, sibling_len in ((3, 3), (40, 40)):
        lp = torch.zeros(2, width, dtype=torch.float64, requires_grad=True)
        mask = torch.zeros(2, width)
        mask[0, :3] = 1.0
        mask[1, :sibling_len] = 1.0
        loss, _ = grpo_loss(lp, lp.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64), mask,
                            loss_type="dr_grpo", max_completion_length=48)
        loss.backward()
        grads.append(lp.grad[0, :3].tolist())
    # ratio 1, A = 1: d(-rho A)/d lp = -1 per token, / (B * L_max) = 2 * 48
    assert grads[0] == pytest.approx([-1 / 96] * 3) and grads[1] == pytest.approx([-1 / 96] * 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, lp.detach(), torch.ones(2, dtype=torch.float64), mask, loss_type="dr_grpo")


def test_loss_units_of_each_loss_type():
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert loss_units(mask, "grpo") == 2.0  # sequences with a counted token
    assert loss_units(mask, "bnpo") == 6.0  # counted tokens
    assert loss_units(mask, "dr_grpo", max_completion_length=10) == 30.0  # rows * budget, not rows * width


def test_grpo_loss_clip_eps_high_widens_upper_bound():
    logprobs, old, adv, mask = ragged_batch()
    # 1 + 0.6 > 1.5: the high clip is now inactive, token (0, 1) contributes -1.5
    loss, stats = grpo_loss(logprobs, old, adv, mask, clip_eps_high=0.6, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1 - 1.5 - 0.5 + 2.2 + 1.6) / 5)
    assert stats["clip_fraction"] == pytest.approx(1 / 5) and stats["clip_fraction_high"] == 0.0


def test_grpo_loss_clipped_tokens_get_no_gradient_and_sign_is_right():
    logprobs, old, adv, mask = ragged_batch()
    loss, _ = grpo_loss(logprobs, old, adv, mask, loss_type="bnpo")
    loss.backward()
    grad = logprobs.grad
    # d/dlp of -rho A / 5 = -rho A / 5 where not clipped; 0 where clipped or masked
    assert grad[0].tolist() == pytest.approx([-1.0 / 5, 0.0, -0.5 / 5])
    assert grad[1].tolist() == pytest.approx([2.2 / 5, 0.0, 0.0])
    assert grad[0, 0] < 0  # positive advantage: gradient descent raises the token's log-prob


def test_grpo_loss_empty_sequence_and_nan_padding_give_no_nan():
    logprobs, old, adv, mask = ragged_batch()
    nan = float("nan")
    padded = torch.cat([logprobs.detach(), torch.full((1, 3), nan, dtype=torch.float64)])
    padded[1, 2] = nan  # garbage under the mask of a real sequence too
    padded.requires_grad_(True)
    old = torch.cat([old, torch.full((1, 3), nan, dtype=torch.float64)])
    loss, stats = grpo_loss(
        padded, old, torch.cat([adv, torch.tensor([3.0], dtype=torch.float64)]),
        torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)]), ref_logprobs=old, beta=0.0,
    )
    assert loss.item() == pytest.approx(0.5)  # the empty sequence is left out of the sequence mean
    assert all(math.isfinite(v) for v in stats.values())
    loss.backward()
    assert torch.isfinite(padded.grad).all() and padded.grad[2].abs().sum() == 0


def test_sdpo_token_loss_nan_padding_gives_finite_gradient():
    lp = torch.tensor([[-0.5, float("nan")]], requires_grad=True)
    loss, _ = sdpo_token_loss(lp, torch.tensor([[-0.2, float("nan")]]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert lp.grad.tolist()[0] == pytest.approx([-0.5 + 0.2, 0.0])


def test_grpo_loss_k3_penalty():
    lp = torch.tensor([[ln(0.5), ln(0.5)]], requires_grad=True)
    ref = torch.tensor([[ln(0.25), ln(0.5)]])
    k3 = 0.5 + ln(2) - 1  # first token; the second matches the reference exactly
    loss, stats = grpo_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * k3 / 2, abs=1e-7)
    assert stats["kl"] == pytest.approx(k3 / 2, abs=1e-7) and stats["pg_loss"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_grpo_loss_validates_names_and_shapes():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), loss_type="ppo")
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(lp, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ------------------------------------------------------------------------------------ SDPO, logits

# Two tokens, vocabulary of three; mask keeps both.
STUDENT = [[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]
TEACHER = [[[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]]
MASK2 = torch.ones(1, 2)


def hand_mean(divergence):
    return sum(divergence(s, t) for s, t in zip(STUDENT[0], TEACHER[0])) / 2


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_sdpo_loss_zero_when_teacher_equals_student(divergence):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    loss, stats = sdpo_loss(logits, logits.clone(), torch.ones(2, 4), divergence=divergence)
    assert abs(loss.item()) < 1e-6
    assert stats["top1_agreement"] == 1.0


def test_sdpo_loss_reverse_and_forward_kl_by_hand():
    reverse, _ = sdpo_loss(logits_of(STUDENT), logits_of(TEACHER), MASK2, divergence="reverse_kl")
    forward, _ = sdpo_loss(logits_of(STUDENT), logits_of(TEACHER), MASK2, divergence="forward_kl")
    # token 0: 0.5 ln(5/7) + 0.3 ln(3/2) + 0.2 ln 2;  token 1: 0.1 ln(1/2) + 0.6 ln 3 + 0.3 ln(1/2)
    assert reverse.item() == pytest.approx(hand_mean(kl_by_hand), abs=1e-12)
    assert forward.item() == pytest.approx(hand_mean(lambda s, t: kl_by_hand(t, s)), abs=1e-12)
    assert reverse.item() == pytest.approx(((0.5 * ln(5 / 7) + 0.3 * ln(1.5) + 0.2 * ln(2))
                                            + (0.1 * ln(0.5) + 0.6 * ln(3) + 0.3 * ln(0.5))) / 2)


def test_sdpo_loss_jsd_by_hand_symmetric_and_bounded():
    def jsd_by_hand(s, t):
        m = [(a + b) / 2 for a, b in zip(s, t)]
        return 0.5 * kl_by_hand(s, m) + 0.5 * kl_by_hand(t, m)

    value, _ = sdpo_loss(logits_of(STUDENT), logits_of(TEACHER), MASK2, divergence="jsd")
    swapped, _ = sdpo_loss(logits_of(TEACHER), logits_of(STUDENT), MASK2, divergence="jsd")
    assert value.item() == pytest.approx(hand_mean(jsd_by_hand), abs=1e-12)
    assert swapped.item() == pytest.approx(value.item(), abs=1e-12)
    # disjoint supports reach the bound log 2
    far = torch.tensor([[[30.0, -30.0]]], dtype=torch.float64), torch.tensor([[[-30.0, 30.0]]], dtype=torch.float64)
    bound, _ = sdpo_loss(*far, torch.ones(1, 1), divergence="jsd")
    assert 0 < bound.item() <= ln(2) + 1e-12 and bound.item() == pytest.approx(ln(2), abs=1e-9)


def test_sdpo_loss_alpha_endpoints_and_mixture():
    student, teacher = logits_of(STUDENT), logits_of(TEACHER)
    at = {a: sdpo_loss(student, teacher, MASK2, alpha=a)[0].item() for a in (0.0, 0.3, 0.5, 1.0)}
    assert at[0.0] == pytest.approx(sdpo_loss(student, teacher, MASK2, divergence="forward_kl")[0].item())
    assert at[1.0] == pytest.approx(sdpo_loss(student, teacher, MASK2, divergence="reverse_kl")[0].item())
    assert at[0.5] == pytest.approx(sdpo_loss(student, teacher, MASK2, divergence="jsd")[0].item())

    def gjsd_by_hand(s, t, a=0.3):  # M = 0.7 S + 0.3 T;  0.7 KL(S||M) + 0.3 KL(T||M)
        m = [(1 - a) * x + a * y for x, y in zip(s, t)]
        return (1 - a) * kl_by_hand(s, m) + a * kl_by_hand(t, m)

    assert at[0.3] == pytest.approx(hand_mean(gjsd_by_hand), abs=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        sdpo_loss(student, teacher, MASK2, alpha=1.5)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("top_k", [5, 8])
def test_sdpo_loss_top_k_at_vocab_size_equals_full(divergence, top_k):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 1]])
    full, _ = sdpo_loss(student, teacher, mask, divergence=divergence)
    top, _ = sdpo_loss(student, teacher, mask, divergence=divergence, top_k=top_k)
    assert top.item() == full.item()


def test_sdpo_loss_top_k_with_tail_by_hand():
    student = logits_of([[[0.2, 0.5, 0.3]]])
    teacher = logits_of([[[0.7, 0.2, 0.1]]])
    mask = torch.ones(1, 1)
    # teacher's top-1 is id 0: buckets {0, rest}: student (0.2, 0.8), teacher (0.7, 0.3)
    loss, stats = sdpo_loss(student, teacher, mask, top_k=1, top_k_from="teacher")
    assert loss.item() == pytest.approx(0.2 * ln(0.2 / 0.7) + 0.8 * ln(0.8 / 0.3), abs=1e-9)
    assert stats["teacher_topk_mass"] == pytest.approx(0.7)
    # the reference's choice and the default, the student's top-1 (id 1): student (0.5, 0.5), teacher (0.2, 0.8)
    loss, stats = sdpo_loss(student, teacher, mask, top_k=1)
    assert loss.item() == pytest.approx(0.5 * ln(0.5 / 0.2) + 0.5 * ln(0.5 / 0.8), abs=1e-9)
    assert stats["teacher_topk_mass"] == pytest.approx(0.2)
    # top-2 of the teacher {0, 1} without tail, renormalised: student (2/7, 5/7), teacher (7/9, 2/9)
    loss, _ = sdpo_loss(student, teacher, mask, top_k=2, add_tail=False, divergence="forward_kl",
                        top_k_from="teacher")
    assert loss.item() == pytest.approx(kl_by_hand([7 / 9, 2 / 9], [2 / 7, 5 / 7]), abs=1e-9)


def test_sdpo_loss_top_k_support_is_the_students_or_the_teachers_jsd_by_hand():
    """Disjoint top-2 supports over 4 tokens (the student ranks ids 0, 1 first, the teacher 3, 2), the
    reference's JSD 0.5 with a tail bucket, two tokens of which one is masked out."""
    student = logits_of([[[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    teacher = logits_of([[[0.1, 0.15, 0.25, 0.5], [0.7, 0.1, 0.1, 0.1]]])
    mask = torch.tensor([[1.0, 0.0]])

    def jsd(s, t):
        m = [(a + b) / 2 for a, b in zip(s, t)]
        return 0.5 * kl_by_hand(s, m) + 0.5 * kl_by_hand(t, m)

    # the student's ids {0, 1} + tail: student (0.4, 0.3, 0.3), teacher (0.1, 0.15, 0.75)
    by_student, stats = sdpo_loss(student, teacher, mask, divergence="jsd", top_k=2, top_k_from="student")
    assert by_student.item() == pytest.approx(jsd([0.4, 0.3, 0.3], [0.1, 0.15, 0.75]), abs=1e-7)
    assert stats["teacher_topk_mass"] == pytest.approx(0.25)
    # the teacher's ids {3, 2} + tail: student (0.1, 0.2, 0.7), teacher (0.5, 0.25, 0.25)
    by_teacher, stats = sdpo_loss(student, teacher, mask, divergence="jsd", top_k=2, top_k_from="teacher")
    assert by_teacher.item() == pytest.approx(jsd([0.1, 0.2, 0.7], [0.5, 0.25, 0.25]), abs=1e-7)
    assert stats["teacher_topk_mass"] == pytest.approx(0.75)
    assert sdpo_loss(student, teacher, mask, divergence="jsd", top_k=2)[0].item() == by_student.item()  # default
    assert abs(by_student.item() - by_teacher.item()) > 0.01  # the two supports give different losses here


def test_sdpo_loss_tail_is_finite_when_top_k_holds_all_mass():
    student = torch.tensor([[[40.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 40.0, 0.0, 0.0]]])
    loss, _ = sdpo_loss(student, teacher, torch.ones(1, 1), top_k=2, divergence="jsd")
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all()


def test_sdpo_loss_teacher_gets_no_gradient_and_masked_positions_none():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [0, 0, 0]])
    loss, _ = sdpo_loss(student, teacher, mask, alpha=0.5, top_k=2)
    loss.backward()
    assert teacher.grad is None
    assert student.grad[0, :2].abs().sum() > 0 and student.grad[0, 2:].abs().sum() == 0
    assert student.grad[1].abs().sum() == 0


def test_sdpo_loss_temperature_divides_both_logits():
    torch.manual_seed(3)
    student, teacher = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    hot, _ = sdpo_loss(student, teacher, torch.ones(1, 2), temperature=2.0)
    scaled, _ = sdpo_loss(student / 2, teacher / 2, torch.ones(1, 2))
    assert hot.item() == pytest.approx(scaled.item(), abs=1e-7)


def test_sdpo_loss_importance_weights_clip_and_detach():
    student, teacher = logits_of(STUDENT).requires_grad_(True), logits_of(TEACHER)
    per_token = [kl_by_hand(s, t) for s, t in zip(STUDENT[0], TEACHER[0])]
    old = torch.zeros(1, 2, dtype=torch.float64)
    sampled = torch.tensor([[ln(1.5), ln(3.0)]], dtype=torch.float64, requires_grad=True)  # ratios 1.5, 3
    loss, stats = sdpo_loss(student, teacher, MASK2, sampled_logprobs=sampled, old_logprobs=old, is_clip=2.0)
    assert loss.item() == pytest.approx((1.5 * per_token[0] + 2.0 * per_token[1]) / 2, abs=1e-12)
    assert stats["is_clip_fraction"] == 0.5 and stats["is_ratio_mean"] == pytest.approx(1.75)
    assert torch.autograd.grad(loss, sampled, allow_unused=True)[0] is None  # the weight is detached
    with pytest.raises(ValueError, match="old sampled-token"):
        sdpo_loss(student, teacher, MASK2, is_clip=2.0)
    with pytest.raises(ValueError, match="mask must be"):
        sdpo_loss(student, teacher, torch.ones(2, 1))


# ------------------------------------------------------------------------------------ SDPO, sampled tokens


def test_sdpo_token_loss_gradient_is_log_ratio():
    lp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7]], requires_grad=True)
    tlp = torch.tensor([[-0.2, -1.5, -2.0], [-1.1, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss, stats = sdpo_token_loss(lp, tlp, mask)
    loss.backward()
    n = mask.sum()
    assert torch.allclose(lp.grad * n, (lp - tlp).detach() * mask)
    # value: mean over tokens of (lp - tlp) * lp
    assert loss.item() == pytest.approx((((lp - tlp) * lp * mask).sum() / n).item())
    assert stats["log_ratio_mean"] == pytest.approx((((lp - tlp) * mask).sum() / n).item())


def test_sdpo_token_loss_importance_weight_clipped():
    lp = torch.tensor([[ln(0.5), ln(0.5)]], requires_grad=True)
    old = torch.tensor([[ln(0.25), ln(0.5)]])  # ratios 2 -> clipped to 1.5, and 1
    tlp = torch.tensor([[ln(0.25), ln(0.25)]])
    loss, stats = sdpo_token_loss(lp, tlp, torch.ones(1, 2), old_logprobs=old, is_clip=1.5)
    expected = (1.5 * ln(2) * ln(0.5) + 1.0 * ln(2) * ln(0.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["is_clip_fraction"] == 0.5


# ------------------------------------------------------------------------------------ SFT


def test_sft_loss_value():
    logprobs = torch.tensor([[ln(0.5), ln(0.25)], [ln(0.1), float("nan")]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = sft_loss(logprobs, mask)
    nll = -(ln(0.5) + ln(0.25) + ln(0.1)) / 3
    assert loss.item() == pytest.approx(nll, abs=1e-6)
    assert stats["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5) and stats["num_tokens"] == 3


def test_generalized_jsd_rejects_alpha_out_of_range():
    with pytest.raises(ValueError):
        generalized_jsd(torch.zeros(3), torch.zeros(3), -0.1)


# ------------------------------------------------------------------------ large vocabularies, in pieces


def _as_pieces(monkeypatch, elements: int) -> None:
    """Make `elements` the piece budget, so a test-sized vocabulary takes the large-vocabulary path."""
    import cptlab.losses as L

    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", elements)


def test_gather_logprobs_in_pieces_equals_one_piece_values_and_gradient(monkeypatch):
    torch.manual_seed(4)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    whole = logits.clone().requires_grad_(True)
    (gather_logprobs(whole, tokens) * weights).sum().backward()
    _as_pieces(monkeypatch, 2 * 11)  # two rows of 11 at a time: 8 pieces for 15 rows
    pieces = logits.clone().requires_grad_(True)
    lp = gather_logprobs(pieces, tokens)
    (lp * weights).sum().backward()
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.detach(), expected)
    torch.testing.assert_close(pieces.grad, whole.grad)
    # d/dz_v of w log p(y) = w (1[v = y] - p_v): checked at one position by hand
    p = torch.softmax(logits[1, 2], -1)
    by_hand = -weights[1, 2] * p
    by_hand[tokens[1, 2]] += weights[1, 2]
    torch.testing.assert_close(pieces.grad[1, 2], by_hand)


def test_gather_logprobs_in_pieces_keeps_the_logits_dtype_for_the_gradient(monkeypatch):
    _as_pieces(monkeypatch, 7)
    logits = torch.randn(2, 3, 7).bfloat16().requires_grad_(True)
    lp = gather_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.shape == logits.shape


@pytest.mark.parametrize("top_k", [None, 3])
def test_sdpo_loss_in_pieces_equals_one_piece_loss_stats_and_gradient(monkeypatch, top_k):
    torch.manual_seed(5)
    student = torch.randn(2, 4, 9, dtype=torch.float64)
    teacher = torch.randn(2, 4, 9, dtype=torch.float64)
    student[1, 3] = float("nan")  # garbage at a masked position never leaks, in pieces either
    mask = torch.tensor([[1.0, 1, 0.5, 0], [1, 1, 1, 0]])
    sampled = torch.randn(2, 4, dtype=torch.float64)
    old = sampled - 0.3 * torch.randn(2, 4, dtype=torch.float64)
    kw = dict(alpha=0.5, top_k=top_k, top_k_from="student", sampled_logprobs=sampled, old_logprobs=old, is_clip=1.2)
    a = student.clone().requires_grad_(True)
    loss_a, stats_a = sdpo_loss(a, teacher, mask, **kw)
    loss_a.backward()
    _as_pieces(monkeypatch, 2 * 9)
    b = student.clone().requires_grad_(True)
    loss_b, stats_b = sdpo_loss(b, teacher, mask, **kw)
    loss_b.backward()
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-12)
    assert stats_b == pytest.approx(stats_a, rel=1e-12)
    assert torch.isfinite(b.grad).all() and b.grad[1, 3].abs().sum() == 0
    torch.testing.assert_close(b.grad, a.grad)


def test_token_entropy_in_pieces(monkeypatch):
    torch.manual_seed(6)
    logits = torch.randn(5, 3, 8)
    whole = token_entropy(logits)
    _as_pieces(monkeypatch, 30)
    torch.testing.assert_close(token_entropy(logits), whole)
    torch.testing.assert_close(token_entropy(logits[:, 0]), whole[:, 0])


def trl_batch():
    """Two sequences (2 and 3 counted tokens), A = [1, -0.5], token ratios rho = [[1.5, 0.5], [1.0, 1.1, 0.7]]."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp = torch.tensor([[-0.5, -1.0, 0.0], [-0.2, -0.3, -2.0]], dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.1, 0.7]], dtype=torch.float64)
    old = lp.detach() - rho.log()
    return lp, old, torch.tensor([1.0, -0.5], dtype=torch.float64), mask.double()


def test_dapo_is_the_clipped_token_mean_over_the_batch():
    """TRL 1.16 `dapo`: sum of -min(rho A, clip(rho) A) over all counted tokens / their number."""
    lp, old, adv, mask = trl_batch()
    loss, _ = grpo_loss(lp, old, adv, mask, loss_type="dapo")
    # per token: -min(1.5, 1.2) = -1.2; -0.5; row 2 (A=-0.5): 0.5, 0.55, 0.4 (0.7 clipped up to 0.8)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.5 + 0.55 + 0.4) / 5)
    loss.backward()
    expected = torch.tensor([[0.0, -0.1, 0.0], [0.1, 0.11, 0.0]], dtype=torch.float64)  # dL/dlp = -rho A / 5
    assert torch.allclose(lp.grad, expected)
    grpo, _ = grpo_loss(lp.detach(), old, adv, mask, loss_type="grpo")
    assert grpo.item() == pytest.approx((-(1.2 + 0.5) / 2 + (0.5 + 0.55 + 0.4) / 3) / 2)


@pytest.mark.parametrize("cap", [5.0, 1.2])
def test_cispo_is_reinforce_weighted_by_the_stopped_capped_ratio(cap):
    """TRL 1.16 `cispo`: -sg[min(rho, epsilon_high)] A lp, token mean; no token loses its gradient."""
    lp, old, adv, mask = trl_batch()
    loss, stats = grpo_loss(lp, old, adv, mask, loss_type="cispo", cispo_max_ratio=cap)
    w = [[min(1.5, cap), 0.5], [1.0, 1.1, 0.7]]
    terms = [-w[0][0] * 1 * -0.5, -w[0][1] * 1 * -1.0, -w[1][0] * -0.5 * -0.2, -w[1][1] * -0.5 * -0.3,
             -w[1][2] * -0.5 * -2.0]
    assert loss.item() == pytest.approx(sum(terms) / 5)
    loss.backward()
    expected = torch.tensor([[-w[0][0], -w[0][1], 0.0], [0.5 * w[1][0], 0.5 * w[1][1], 0.5 * w[1][2]]],
                            dtype=torch.float64) / 5
    assert torch.allclose(lp.grad, expected)
    assert stats["clip_fraction"] == pytest.approx(0.2 if cap < 1.5 else 0.0)


@pytest.mark.parametrize("eps, clipped", [(0.2, False), (3e-4, True)])
def test_gspo_clips_one_sequence_level_ratio(eps, clipped):
    """GSPO (TRL importance_sampling_level="sequence"): s_i = exp(mean_t log rho), clipped surrogate per
    sequence, sequence mean of token means."""
    lp, old, adv, mask = trl_batch()
    s = [math.sqrt(1.5 * 0.5), (1.0 * 1.1 * 0.7) ** (1 / 3)]
    loss, _ = grpo_loss(lp, old, adv, mask, loss_type="gspo", clip_eps=eps,
                        clip_eps_high=4e-4 if eps < 0.01 else None)
    row1 = 0.5 * (1 - eps) if clipped else 0.5 * s[1]  # A < 0: -min(s A, clip(s) A) = 0.5 max(s, 1 - eps)
    assert loss.item() == pytest.approx((-s[0] + row1) / 2)
    loss.backward()
    # d/dlp_t of -s_0 over row 0 (2 tokens): -s_0 / 2 per token, then / 2 sequences
    assert torch.allclose(lp.grad[0, :2], torch.full((2,), -s[0] / 4, dtype=torch.float64))
    row1_grad = torch.zeros(3, dtype=torch.float64) if clipped else torch.full((3,), 0.5 * s[1] / 3 / 2,
                                                                                  dtype=torch.float64)
    assert torch.allclose(lp.grad[1], row1_grad)


def test_unknown_loss_type_names_the_registered_ones():
    lp, old, adv, mask = trl_batch()
    with pytest.raises(ValueError, match="'cispo', 'dapo'"):
        grpo_loss(lp, old, adv, mask, loss_type="ppo")


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others_and_registered():
    from cptlab.losses import ADVANTAGE_ESTIMATORS, rloo_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    ids = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7])
    # group 3: each 1 against (0 + 0 + 1) / 3, each 0 against (1 + 0 + 1) / 3; group 7: all equal, 0
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(rloo_advantages(rewards, ids), expected)
    # the rows need not be contiguous: keyed by group id
    perm = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    assert torch.allclose(rloo_advantages(rewards[perm], ids[perm]), expected[perm])
    assert torch.equal(rloo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1])), torch.zeros(2))
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo"}
    assert torch.equal(ADVANTAGE_ESTIMATORS["grpo"](rewards, ids, scale=False),
                       grouped_advantages(rewards, ids, scale=False))


def test_the_advantage_estimator_is_chosen_by_config_and_an_unknown_one_is_one_line():
    from cptlab.config import ConfigError, load_config

    assert load_config("smoke", ["method.grpo.advantage=rloo"]).method.grpo.advantage == "rloo"
    with pytest.raises(ConfigError, match=r"method.grpo.advantage' = 'rlo': did you mean 'rloo'\?"):
        load_config("smoke", ["method.grpo.advantage=rlo"])


def test_the_grpo_method_reads_its_advantages_from_the_configured_estimator():
    from cptlab.config import GRPOConfig, MethodConfig
    from cptlab.losses import rloo_advantages
    from helpers import method_and_batch, new_tiny_model

    model = new_tiny_model()
    method, batch = method_and_batch(model, MethodConfig(name="grpo", grpo=GRPOConfig(advantage="rloo")))
    batch.rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0.5, 1, 0, 0])
    got = method._advantages(batch)
    assert torch.allclose(got, rloo_advantages(batch.rewards, batch.rollout.group_ids))
    assert not torch.allclose(got, grouped_advantages(batch.rewards, batch.rollout.group_ids))
