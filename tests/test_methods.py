import copy
import math

import pytest
import torch

from cptlab.config import MethodConfig, PromptConfig, RolloutConfig
from cptlab.methods import GRPO, SDPO, SFT, MethodContext
from cptlab.rollout import make_generator
from cptlab.tasks import make_split
from helpers import noisy_model, sdpo_config

ROLL = RolloutConfig(group_size=4, max_new_tokens=10)


def ctx_for(tokenizer, base=None, prompt=PromptConfig(), rollout=ROLL):
    return MethodContext(tokenizer, prompt, rollout, torch.device("cpu"), base=base)


def gen(seed):
    return make_generator(seed)


def test_grpo_batch_and_loss(tiny_model, tokenizer):
    examples = make_split("sorting", "train", 3)
    method = GRPO(MethodConfig(updates_per_batch=2), ctx_for(tokenizer, base=copy.deepcopy(tiny_model)), tiny_model)
    batch = method.make_batch(tiny_model, examples, gen(1))
    assert batch.rollout.completion_ids.shape[0] == 12 and batch.advantages.shape == (12,)
    assert batch.old_logprobs is not None and batch.ref_logprobs is not None  # mu > 1 keeps behaviour log-probs
    terms, stats = method.loss(tiny_model, batch)
    assert list(terms) == ["pg"] and torch.isfinite(terms["pg"])
    assert stats["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= stats["clip_fraction"] <= 1.0


def test_same_seed_same_rollout(tiny_model, tokenizer):
    examples = make_split("sorting", "train", 2)
    method = GRPO(MethodConfig(), ctx_for(tokenizer), tiny_model)
    a = method.make_batch(tiny_model, examples, gen(5))
    b = method.make_batch(tiny_model, examples, gen(5))
    assert a.rollout.texts == b.rollout.texts
    assert a.rollout.group_ids.tolist() == [0] * 4 + [1] * 4
    assert [ex.question for ex in a.examples] == [examples[0].question] * 4 + [examples[1].question] * 4


def test_grpo_step_raises_logprob_of_positive_advantage_sample(tiny_model, tokenizer):
    examples = make_split("sorting", "train", 1)
    method = GRPO(MethodConfig(), ctx_for(tokenizer), tiny_model)
    batch = method.make_batch(tiny_model, examples, gen(2))
    batch.advantages = torch.tensor([1.0, -1.0, 0.0, 0.0])  # plant advantages
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    lp_before = batch.rollout.logprobs(tiny_model).detach()
    terms, _ = method.loss(tiny_model, batch)
    opt.zero_grad(); terms["pg"].backward(); opt.step()
    lp_after = batch.rollout.logprobs(tiny_model).detach()
    m = batch.rollout.completion_mask
    gain = ((lp_after - lp_before) * m).sum(-1)
    assert gain[0] > 0 and gain[1] < 0


def test_sdpo_with_identical_teacher_context_has_zero_loss_and_grad(tiny_model, tokenizer):
    # a reprompt that adds nothing: the teacher sees exactly the student's context
    same = PromptConfig(reprompt_template="{prompt}", solution_template="", feedback_template="")
    cfg = MethodConfig(name="sdpo", sdpo=sdpo_config(teacher_mode="current", no_demo="feedback", demo_source="reference"))
    method = SDPO(cfg, ctx_for(tokenizer, prompt=same), tiny_model)
    batch = method.make_batch(tiny_model, make_split("arithmetic", "train", 2), gen(3))
    assert batch.distill.sum() == 8
    terms, stats = method.loss(tiny_model, batch)
    loss = terms["sdpo"]
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in tiny_model.parameters())


def jsd_by_hand(student, teacher, batch, temperature: float) -> float:
    """SDPO's logit-level loss computed here in float64 from two plain forwards: the student's
    next-token distribution S after the plain prompt, the teacher's T after the reprompt, M = S/2 + T/2,
    JSD = KL(S || M)/2 + KL(T || M)/2 per completion token, averaged over the distilled rows' tokens."""
    ro = batch.rollout

    def log_probs(model, prompt_ids, prompt_mask):
        mask = torch.cat([prompt_mask, ro.completion_mask.long()], 1)
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt_ids, ro.completion_ids], 1), attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        return torch.log_softmax(logits[:, prompt_ids.shape[1] - 1:-1].double() / temperature, -1)

    log_s = log_probs(student, ro.prompt_ids, ro.prompt_mask)
    log_t = log_probs(teacher, batch.teacher_ids, batch.teacher_mask)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), 0) - math.log(2)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    mask = ro.completion_mask.double() * batch.distill.double()[:, None]
    return float(((0.5 * kl_s + 0.5 * kl_t) * mask).sum() / mask.sum())


def test_sdpo_loss_is_the_jensen_shannon_divergence_to_the_reprompted_teacher(tokenizer):
    model = noisy_model(tokenizer)  # its next-token distributions depend on the context (the tiny one's barely)
    cfg = MethodConfig(name="sdpo", sdpo=sdpo_config(teacher_mode="current", top_k=None, demo_source="reference"))
    method = SDPO(cfg, ctx_for(tokenizer), model)
    batch = method.make_batch(model, make_split("arithmetic", "train", 2), gen(3))
    batch.distill = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1])  # rows without a teacher count for nothing
    terms, stats = method.loss(model, batch)
    expected = jsd_by_hand(model, model, batch, batch.rollout.temperature * cfg.sdpo.distillation.temperature)
    assert expected > 1e-2  # the demonstration in the reprompt moved the teacher's distribution
    assert float(terms["sdpo"]) == pytest.approx(expected, rel=1e-5)
    batch.distill = torch.ones(8)
    assert float(method.loss(model, batch)[0]["sdpo"]) != pytest.approx(expected, rel=1e-3)


def test_sdpo_ema_teacher_is_a_copy_that_gets_no_grad(tokenizer):
    model = noisy_model(tokenizer)
    cfg = MethodConfig(name="sdpo", sdpo=sdpo_config(teacher_mode="ema", ema_rate=0.1, top_k=None,
                                                    demo_source="reference"))
    method = SDPO(cfg, ctx_for(tokenizer), model)
    batch = method.make_batch(model, make_split("arithmetic", "train", 2), gen(3))
    terms, stats = method.loss(model, batch)
    # before any update the EMA copy holds the student's weights: the same divergence, from the copy
    expected = jsd_by_hand(model, method.teacher.copy, batch, batch.rollout.temperature)
    assert float(terms["sdpo"]) == pytest.approx(expected, rel=1e-5) and expected > 1e-2
    terms["sdpo"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
    assert all(p.grad is None for p in method.teacher.copy.parameters())
    assert list(method.state_dict()) == ["teacher"]  # what a checkpoint keeps


def test_sft_loss_is_cross_entropy_on_reference(tiny_model, tokenizer):
    examples = make_split("gcd", "train", 3)
    method = SFT(MethodConfig(name="sft"), ctx_for(tokenizer), tiny_model)
    batch = method.make_batch(tiny_model, examples, None)
    terms, _ = method.loss(tiny_model, batch)
    loss = terms["sft"]
    ro = batch.rollout
    logits = tiny_model(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                        attention_mask=torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1),
                        position_ids=(torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1).cumsum(-1) - 1).clamp(min=0)
                        ).logits[:, ro.prompt_ids.shape[1] - 1:-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ro.completion_ids.reshape(-1),
                                           reduction="none").view_as(ro.completion_mask)
    expected = (ce * ro.completion_mask).sum() / ro.completion_mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
