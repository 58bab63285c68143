"""The trainer's one loss normaliser: micro-batched and 2-rank gradients equal the whole batch's, for
every method, GRPO loss type and SDPO loss mix; the method's update schedule (EMA once per batch)."""

import math

import pytest
import torch

from cptlab.config import GRPOConfig, MethodConfig, PromptConfig, RolloutConfig, StageConfig
from cptlab.methods import MethodContext, build_method
from cptlab.models import build_tokenizer
from cptlab.rollout import make_generator
from cptlab.tasks import make_split
from cptlab.step import accumulate_gradients
from cptlab.trainer import StageRun, TrainSampler, train_stage
from helpers import BATCH_ROLLOUT, method_and_batch, new_tiny_model, spawn, sdpo_config

CASES = {
    **{f"grpo-{t}": MethodConfig(name="grpo", grpo=GRPOConfig(loss_type=t, beta=0.1)) for t in ("grpo", "bnpo", "dr_grpo")},
    "sdpo": MethodConfig(name="sdpo", sdpo=sdpo_config(demo_source="reference")),
    "sdpo-sampled_token": MethodConfig(name="sdpo", sdpo=sdpo_config(demo_source="reference", divergence="reverse_kl",
                                                                    distillation="sampled_token")),
    **{f"sdpo-mix-{t}": MethodConfig(name="sdpo", sdpo=sdpo_config(demo_source="reference", blend_lambda=0.4),
                                     grpo=GRPOConfig(loss_type=t, clip_eps=0.1))
       for t in ("grpo", "bnpo", "dr_grpo")},
    "sft": MethodConfig(name="sft"),
}


def whole_batch_gradient(method, model, batch) -> list[torch.Tensor]:
    """The definition: each loss term a mean over the whole batch, summed."""
    model.zero_grad(set_to_none=True)
    terms, _ = method.loss(model, batch)
    sum(terms.values()).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_same_gradient(model, expected, what):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7, msg=what)
    assert max(float(e.abs().max()) for e in expected) > 1e-5, f"{what}: a zero gradient proves nothing"


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batched_gradient_equals_the_whole_batch_gradient(case):
    model = new_tiny_model().train()
    method, batch = method_and_batch(model, CASES[case])
    expected = whole_batch_gradient(method, model, batch)
    for micro in (1, 3, 5):
        model.zero_grad(set_to_none=True)
        loss, _ = accumulate_gradients(method, model, batch, micro_batch_size=micro)
        assert_same_gradient(model, expected, f"{case}, micro_batch_size={micro}")
        terms, _ = method.loss(model, batch)
        assert loss == pytest.approx(float(sum(terms.values()).detach()), rel=1e-5)


def test_sdpo_loss_mix_grpo_term_is_grpo_with_the_grpo_config():
    """blend_lambda = 1 leaves only the GRPO term: it is GRPO's loss with the grpo section's clip,
    loss type and reward scaling (before, it was a default-clipped "grpo" loss whatever the config)."""
    grpo_cfg = GRPOConfig(clip_eps=0.05, clip_eps_high=0.1, loss_type="dr_grpo", scale_rewards=False)
    model = new_tiny_model().train()
    sdpo, batch = method_and_batch(model, MethodConfig(name="sdpo", grpo=grpo_cfg,
                                                       sdpo=sdpo_config(demo_source="reference", blend_lambda=1.0)))
    grpo = build_method(MethodConfig(name="grpo", grpo=grpo_cfg), sdpo.ctx, model)
    batch.rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    batch.advantages = sdpo._advantages(batch)
    assert batch.advantages[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])  # centred, not scaled
    terms, stats = sdpo.loss(model, batch)
    pg, _ = grpo.loss(model, batch)
    assert float(terms["sdpo"]) == 0.0 and float(terms["grpo"]) == pytest.approx(float(pg["pg"]), rel=1e-6)
    assert stats["grpo/clip_fraction"] > 0  # the planted ratios leave the narrow clip range
    units = {k: (t.count(), t.scale) for k, t in sdpo.loss_terms(batch).items()}
    assert units == {"sdpo": (float(batch.rollout.completion_mask[batch.distill > 0].sum()), 0.0),
                     "grpo": (16 * BATCH_ROLLOUT.max_new_tokens, 1.0)}


def test_behaviour_logprobs_are_computed_without_dropout_at_the_sampling_temperature():
    model = new_tiny_model()
    for module in model.modules():  # dropout in attention: train-mode forwards are noisy
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    rollout = RolloutConfig(group_size=2, max_new_tokens=6, temperature=0.5)
    ctx = MethodContext(build_tokenizer(), PromptConfig(), rollout, torch.device("cpu"))
    method = build_method(MethodConfig(updates_per_batch=2, track_base_kl=False), ctx, model)
    batch = method.make_batch(model, make_split("gcd", "train", 2), make_generator(0))
    assert model.training and batch.rollout.temperature == 0.5
    ro = batch.rollout
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                       attention_mask=torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1),
                       position_ids=(torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1).cumsum(-1) - 1).clamp(min=0)
                       ).logits[:, ro.prompt_ids.shape[1] - 1:-1]
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, ro.completion_ids[..., None])[..., 0]
    m = ro.completion_mask > 0
    torch.testing.assert_close(batch.old_logprobs[m], expected[m], rtol=1e-5, atol=1e-5)


def test_ema_teacher_updates_once_per_rollout_batch_after_its_updates():
    """mu = 3 optimizer steps on one batch, then one EMA update: theta_T = (1 - r) theta_0 + r theta_3."""
    model = new_tiny_model()
    initial = [p.detach().clone() for p in model.parameters()]
    mcfg = MethodConfig(name="sdpo", updates_per_batch=3, prompts_per_step=2, lr=1e-2, warmup_steps=0,
                        track_base_kl=False, sdpo=sdpo_config(demo_source="reference", teacher_mode="ema", ema_rate=0.5))
    ctx = MethodContext(build_tokenizer(), PromptConfig(), RolloutConfig(group_size=2, max_new_tokens=6),
                        torch.device("cpu"))
    method = build_method(mcfg, ctx, model)
    logged = []
    run = StageRun(1, StageConfig(domain="gcd", steps=1), mcfg, model, torch.optim.SGD(model.parameters(), lr=1e-2),
                   method, TrainSampler("gcd", 0, 1, PromptConfig(), pool_size=8), 0,
                   lambda event, **f: logged.append(f), lambda step, gstep: None)
    train_stage(run, 0, 0)
    moved = [float((p - p0).abs().max()) for p, p0 in zip(model.parameters(), initial)]
    assert max(moved) > 0 and logged[0]["skipped_batches"] == 0
    for t, p0, p in zip(method.teacher.copy.parameters(), initial, model.parameters()):
        torch.testing.assert_close(t, 0.5 * p0 + 0.5 * p.detach())


# -- two gloo ranks --------------------------------------------------------------------------------


def _check_two_ranks(info):
    for case, mcfg in CASES.items():
        model = new_tiny_model().train()
        method, batch = method_and_batch(model, mcfg)
        expected = whole_batch_gradient(method, model, batch)
        half = len(batch) // 2  # whole groups: rank r keeps prompts 2r, 2r+1 (rows 8r .. 8r+7)
        local = batch.select(slice(info.rank * half, (info.rank + 1) * half))
        for micro in (0, 3):
            from cptlab import distributed as D

            model.zero_grad(set_to_none=True)
            loss, _ = accumulate_gradients(method, model, local, micro_batch_size=micro)
            D.all_reduce_grads(list(model.parameters()))
            assert_same_gradient(model, expected, f"{case}, 2 ranks, micro_batch_size={micro}")
            terms, _ = method.loss(model, batch)
            assert math.isclose(D.all_reduce_mean({"loss": loss})["loss"], float(sum(terms.values()).detach()), rel_tol=1e-5)


@pytest.mark.slow  # two spawned ranks
def test_two_ranks_gradient_equals_the_whole_batch_gradient():
    spawn(_check_two_ranks, timeout_minutes=5)  # both ranks build models between collectives: slack on a busy CPU
