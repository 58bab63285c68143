"""Training methods as small strategy objects: GRPO, SDPO and SFT.

Each method turns a list of examples into a `Batch` (rollouts, rewards and whatever its loss needs,
computed once per batch) and a `Batch` into a loss (recomputed for each of the mu updates).
The losses themselves are pure tensor functions in `losses.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .config import MethodConfig, PromptConfig, RolloutConfig
from .losses import (gather_logprobs, group_advantages, grpo_loss, k3_kl, loss_units, masked_mean, sdpo_loss,
                     sft_loss, token_entropy)
from .prompts import student_prompt
from .rollout import Rollout, completion_logits, completion_logprobs, encode_prompts, generate, rollout_from_texts
from .tasks import Example, Verdict, verify
from .teacher import Teacher, build_reprompts


@dataclass
class Batch:
    examples: list[Example]
    """One per row (prompts repeated group_size times for on-policy methods)."""
    rollout: Rollout
    verdicts: list[Verdict] | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    teacher_ids: Tensor | None = None
    teacher_mask: Tensor | None = None
    distill: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def select(self, rows: slice) -> "Batch":
        """A micro-batch: every per-row field sliced; the batch-level stats stay with the batch."""
        parts = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "stats":
                parts[f.name] = {}
            elif isinstance(value, Rollout):
                parts[f.name] = value.select(rows)
            else:
                parts[f.name] = None if value is None else value[rows]
        return Batch(**parts)


@dataclass
class MethodContext:
    tokenizer: object
    prompt: PromptConfig
    rollout: RolloutConfig
    device: torch.device
    base: object | None = None
    """The stage's reference model (for the GRPO KL term and KL-to-base logging), or None."""
    teacher: Teacher | None = None


class OnPolicyMethod:
    """Shared by GRPO and SDPO: sample G completions per prompt, verify, keep behaviour log-probs."""

    name = "on_policy"

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        self.cfg, self.ctx = cfg, ctx

    def make_batch(self, model, examples: list[Example], seed: int) -> Batch:
        ctx, G = self.ctx, self.ctx.rollout.group_size
        rows = [ex for ex in examples for _ in range(G)]
        prompts = [student_prompt(ctx.prompt, ex.question, ctx.tokenizer) for ex in rows]
        ro = generate(model, ctx.tokenizer, prompts, max_new_tokens=ctx.rollout.max_new_tokens,
                      temperature=ctx.rollout.temperature, top_p=ctx.rollout.top_p,
                      batch_size=ctx.rollout.batch_size, seed=seed, engine=ctx.rollout.engine,
                      cuda_graphs=ctx.rollout.cuda_graphs)
        verdicts = [verify(ex, text, ctx.prompt.style) for ex, text in zip(rows, ro.texts)]
        rewards = torch.tensor([v.reward for v in verdicts], device=ctx.device)
        batch = Batch(rows, ro, verdicts, rewards)
        with torch.no_grad():
            if self.cfg.updates_per_batch > 1:  # behaviour policy log-probs for the ratio
                batch.old_logprobs = self._logprobs(model, ro)
            if ctx.base is not None:
                batch.ref_logprobs = self._logprobs(ctx.base, ro)
        groups = rewards.view(-1, G)
        batch.stats.update({
            "reward": float(rewards.mean()),
            "accuracy": sum(v.correct for v in verdicts) / len(verdicts),
            "format_rate": sum(v.well_formed for v in verdicts) / len(verdicts),
            "response_length": float(ro.lengths.mean()),
            "zero_variance_groups": float((groups.std(-1) == 0).float().mean()),
        })
        return batch

    def _logprobs(self, model, ro: Rollout) -> Tensor:
        return completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                   batch_size=self.ctx.rollout.batch_size)

    def _student(self, model, batch: Batch) -> tuple[Tensor, Tensor, dict]:
        ro = batch.rollout
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        logprobs = gather_logprobs(logits, ro.completion_ids)
        stats = {"entropy": float(masked_mean(token_entropy(logits.detach()), ro.completion_mask))}
        if batch.ref_logprobs is not None:
            stats["kl_to_base"] = float(masked_mean(k3_kl(logprobs.detach(), batch.ref_logprobs), ro.completion_mask))
        return logits, logprobs, stats

    def loss_units(self, batch: Batch) -> float:
        """How many units the loss is a mean over (micro-batch weights are ratios of these)."""
        return loss_units(batch.rollout.completion_mask, self.cfg.grpo.loss_type)

    def after_step(self) -> None:
        pass


class GRPO(OnPolicyMethod):
    """Group-normalised sequence rewards, clipped policy gradient, optional k3 KL (DeepSeekMath)."""

    name = "grpo"

    def make_batch(self, model, examples, seed):
        batch = super().make_batch(model, examples, seed)
        batch.advantages = group_advantages(batch.rewards, self.ctx.rollout.group_size,
                                            scale=self.cfg.grpo.scale_rewards)
        return batch

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict]:
        g = self.cfg.grpo
        _, logprobs, stats = self._student(model, batch)
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        loss, s = grpo_loss(logprobs, old, batch.advantages, batch.rollout.completion_mask,
                            ref_logprobs=batch.ref_logprobs if g.beta > 0 else None, beta=g.beta,
                            clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high, loss_type=g.loss_type)
        return loss, {**stats, **s}


class SDPO(OnPolicyMethod):
    """On-policy self-distillation: the student (plain prompt) is pulled toward the self-teacher's
    (reprompt) next-token distribution at every completion token."""

    name = "sdpo"

    def make_batch(self, model, examples, seed):
        batch = super().make_batch(model, examples, seed)
        s, ctx = self.cfg.sdpo, self.ctx
        rep = build_reprompts(batch.examples, batch.rollout.texts, batch.verdicts, ctx.rollout.group_size, s,
                              ctx.prompt, ctx.tokenizer)
        batch.teacher_ids, batch.teacher_mask = encode_prompts(ctx.tokenizer, rep.texts, ctx.device)
        batch.distill = torch.tensor(rep.distill, dtype=torch.float32, device=ctx.device)
        batch.stats.update(rep.stats)
        if s.blend_lambda > 0:
            batch.advantages = group_advantages(batch.rewards, ctx.rollout.group_size)
        return batch

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict]:
        s, ro = self.cfg.sdpo, batch.rollout
        logits, logprobs, stats = self._student(model, batch)
        teacher_logits = self.ctx.teacher.logits(lambda m: completion_logits(
            m, batch.teacher_ids, batch.teacher_mask, ro.completion_ids, ro.completion_mask))
        mask = ro.completion_mask * batch.distill[:, None]
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        loss, sd = sdpo_loss(logits, teacher_logits, mask, divergence=s.divergence, alpha=s.alpha, top_k=s.top_k,
                             add_tail=s.add_tail, temperature=s.temperature, sampled_logprobs=logprobs,
                             old_logprobs=old, is_clip=s.is_clip)
        stats.update({f"sdpo/{k}": v for k, v in sd.items()})
        if s.blend_lambda > 0:  # TRL's "hybrid": mix in the clipped GRPO loss
            pg, _ = grpo_loss(logprobs, old, batch.advantages, ro.completion_mask)
            loss = (1 - s.blend_lambda) * loss + s.blend_lambda * pg
        return loss, stats

    def loss_units(self, batch: Batch) -> float:
        # token mean over the distilled tokens; with blend_lambda > 0 the GRPO part (a sequence mean) is
        # weighted by the same tokens, exact only when micro-batches hold equal shares of both
        return loss_units(batch.rollout.completion_mask * batch.distill[:, None], "bnpo")

    def after_step(self) -> None:
        self.ctx.teacher.after_step()


class SFT:
    """Off-policy baseline: token cross-entropy on the reference solutions."""

    name = "sft"

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        self.cfg, self.ctx = cfg, ctx

    def make_batch(self, model, examples: list[Example], seed: int) -> Batch:
        ctx = self.ctx
        prompts = [student_prompt(ctx.prompt, ex.question, ctx.tokenizer) for ex in examples]
        ro = rollout_from_texts(ctx.tokenizer, prompts, [ex.solution() for ex in examples], ctx.device)
        return Batch(list(examples), ro, stats={"response_length": float(ro.lengths.mean())})

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict]:
        ro = batch.rollout
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        loss, stats = sft_loss(gather_logprobs(logits, ro.completion_ids), ro.completion_mask)
        stats["entropy"] = float(masked_mean(token_entropy(logits.detach()), ro.completion_mask))
        return loss, stats

    def loss_units(self, batch: Batch) -> float:
        return loss_units(batch.rollout.completion_mask, "bnpo")

    def after_step(self) -> None:
        pass


METHODS = {"grpo": GRPO, "sdpo": SDPO, "sft": SFT}


def examples_per_step(cfg: MethodConfig, group_size: int) -> int:
    """Distinct examples drawn per step: SFT sees as many sequences as the on-policy methods."""
    return cfg.prompts_per_step * (group_size if cfg.name == "sft" else 1)
