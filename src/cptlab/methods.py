"""Training methods as small strategy objects: GRPO, SDPO and SFT.

A method owns what its loss needs beyond the model being trained: the base reference it scores
against (when it asks for one), the self-teacher's weights (SDPO), what of those a checkpoint keeps
(`state_dict` / `load_state_dict`) and when they update (`after_batch`). Per step:

    batch = method.make_batch(model, examples, generator)   # once per rollout batch
    method.loss_terms(batch) -> {term: LossTerm}              # what each term is a mean over (mask, units)
    method.loss_sums(model, batch) -> ({term: sum}, stats)    # each term summed over its units
    method.after_batch()                                     # once, after the batch's updates

`step.train_step` divides each sum by the units of the whole batch on all ranks (the one normaliser);
the losses themselves are pure tensor functions in `losses.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .config import MethodConfig, PromptConfig, RolloutConfig
from .losses import (ADVANTAGE_ESTIMATORS, gather_logprobs, grpo_loss, k3_kl, loss_units_of, masked_mean, sdpo_loss,
                     sdpo_token_loss, sft_loss, token_entropy, zero_variance_fraction)
from .prompts import student_prompt
from .rollout import Rollout, SamplingSpec, encode_prompts, eval_mode, generate, rollout_from_texts
from .step import LossTerm
from .tasks import Example, Verdict, verify_batch
from .teacher import build_reprompts, teacher_from_config


@dataclass
class Batch:
    examples: list[Example]
    """One per row (each prompt's example repeated for its group_size samples, on-policy)."""
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
        return int(self.rollout.completion_ids.shape[0])

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
    """The base model, frozen: the method uses it as its reference (GRPO's KL term, KL-to-base
    logging, a teacher sourced from or anchored at the base) where its config asks for one."""
    stage_steps: int = 0
    """The stage's rollout batches, for schedules given as fractions of the stage (a stable
    teacher's `stable_restart_at`); 0 for a stage of no steps."""


class Method:
    """What every method answers; see the module docstring for the order the trainer calls it in.
    A method is registered by name (`register_method`) and declares which sections of the method
    config it reads (`sections`: settings of a section no stage reads are refused when a config is
    loaded) and the training curves its report section draws (`report`)."""

    name = ""
    report: tuple[str, str, tuple[str, ...]] | None = None
    """(title, one-line meaning, train-record keys) of the report section of this method's own curves."""

    @classmethod
    def sections(cls, cfg: MethodConfig) -> set[str]:
        """The sub-sections of `cfg` (MethodConfig fields holding a config section) this method reads."""
        return set()

    def __init__(self, cfg: MethodConfig, ctx: MethodContext, model):
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def examples_per_step(cls, cfg: MethodConfig, group_size: int) -> int:
        """Distinct examples drawn per step."""
        return cfg.prompts_per_step

    def make_batch(self, model, examples: list[Example], generator: torch.Generator | None) -> Batch:
        raise NotImplementedError

    def loss_terms(self, batch: Batch) -> dict[str, LossTerm]:
        """What each loss term is a mean over (its mask and units), for the whole batch."""
        raise NotImplementedError

    def loss_sums(self, model, batch: Batch) -> tuple[dict[str, Tensor], dict]:
        """Each loss term summed over its units, on `batch` (a micro-batch of the batch), and stats."""
        raise NotImplementedError

    def loss(self, model, batch: Batch) -> tuple[dict[str, Tensor], dict]:
        """Each term as a mean over its units on `batch`, times its scale: the loss in one piece, no
        micro-batches or ranks (tests and benchmark checks; training goes through step.train_step)."""
        terms = self.loss_terms(batch)
        sums, stats = self.loss_sums(model, batch)
        means = {}
        for k, v in sums.items():
            units = terms[k].count()
            means[k] = terms[k].scale * (v / units if units > 0 else v * 0.0)
        return means, stats

    def after_batch(self) -> None:
        """Called once per rollout batch, after its updates."""

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """name -> tensors a checkpoint must keep to resume this method mid-stage."""
        return {}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore what `state_dict` gave (raises ValueError if it does not fit)."""


METHODS: dict[str, type[Method]] = {}
"""method.name -> its class."""


def register_method(name: str):
    """Class decorator: the method of `method.name = name`."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


class OnPolicyMethod(Method):
    """Shared by GRPO and SDPO: sample G completions per prompt, verify, keep behaviour log-probs."""

    def __init__(self, cfg: MethodConfig, ctx: MethodContext, model):
        super().__init__(cfg, ctx, model)
        self.sampling = SamplingSpec.for_rollout(ctx.rollout)
        self.reference = ctx.base if (cfg.grpo.beta > 0 or cfg.track_base_kl) else None

    def make_batch(self, model, examples: list[Example], generator: torch.Generator | None) -> Batch:
        ctx = self.ctx
        prompts = [student_prompt(ctx.prompt, ex.question, ctx.tokenizer) for ex in examples]
        ro = generate(model, ctx.tokenizer, prompts, self.sampling, generator=generator,
                      group_size=ctx.rollout.group_size)
        rows = [examples[g] for g in ro.group_ids.tolist()]
        verdicts = verify_batch(rows, ro.texts, ctx.prompt.style)
        rewards = torch.tensor([v.reward for v in verdicts], device=ctx.device)
        batch = Batch(rows, ro, verdicts, rewards)
        # behaviour log-probs in eval mode: the policy that sampled had no dropout (LoRA's included)
        with torch.no_grad(), eval_mode(model):
            if self.cfg.updates_per_batch > 1:  # the ratio's denominator for updates 2..mu
                batch.old_logprobs = ro.logprobs(model, self.sampling.batch_size)
            if self.reference is not None:
                batch.ref_logprobs = ro.logprobs(self.reference, self.sampling.batch_size)
        batch.stats.update({
            "reward": float(rewards.mean()),
            "accuracy": sum(v.correct for v in verdicts) / len(verdicts),
            "format_rate": sum(v.well_formed for v in verdicts) / len(verdicts),
            "response_length": float(ro.lengths.mean()),
            "zero_variance_groups": zero_variance_fraction(rewards, ro.group_ids),
            "verifier_errors": sum(v.error is not None for v in verdicts),
        })
        return batch

    def _student(self, model, batch: Batch) -> tuple[Tensor, Tensor, dict]:
        ro = batch.rollout
        logits = ro.logits(model)
        logprobs = gather_logprobs(logits, ro.completion_ids)
        stats = {"entropy": float(masked_mean(token_entropy(logits.detach()), ro.completion_mask))}
        if batch.ref_logprobs is not None:
            stats["kl_to_base"] = float(masked_mean(k3_kl(logprobs.detach(), batch.ref_logprobs), ro.completion_mask))
        return logits, logprobs, stats

    def _advantages(self, batch: Batch) -> Tensor:
        g = self.cfg.grpo
        return ADVANTAGE_ESTIMATORS[g.advantage](batch.rewards, batch.rollout.group_ids, scale=g.scale_rewards)

    def _grpo_term(self, batch: Batch, scale: float = 1.0) -> LossTerm:
        return LossTerm(batch.rollout.completion_mask, loss_units_of(self.cfg.grpo.loss_type),
                        self.sampling.max_new_tokens, scale)

    def _grpo_loss(self, logprobs: Tensor, batch: Batch) -> tuple[Tensor, dict]:
        """The policy gradient (+ beta k3 KL) of the `grpo` config section, summed over its units."""
        g = self.cfg.grpo
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        return grpo_loss(logprobs, old, batch.advantages, batch.rollout.completion_mask,
                         ref_logprobs=batch.ref_logprobs if g.beta > 0 else None, beta=g.beta, clip_eps=g.clip_eps,
                         clip_eps_high=g.clip_eps_high, loss_type=g.loss_type,
                         max_completion_length=self.sampling.max_new_tokens, cispo_max_ratio=g.cispo_max_ratio,
                         reduction="sum")


@register_method("grpo")
class GRPO(OnPolicyMethod):
    """Group-normalised sequence rewards, clipped policy gradient, optional k3 KL (DeepSeekMath)."""

    @classmethod
    def sections(cls, cfg: MethodConfig) -> set[str]:
        return {"grpo"}

    def make_batch(self, model, examples, generator):
        batch = super().make_batch(model, examples, generator)
        batch.advantages = self._advantages(batch)
        return batch

    def loss_terms(self, batch: Batch) -> dict[str, LossTerm]:
        return {"pg": self._grpo_term(batch)}

    def loss_sums(self, model, batch: Batch) -> tuple[dict[str, Tensor], dict]:
        _, logprobs, stats = self._student(model, batch)
        loss, s = self._grpo_loss(logprobs, batch)
        return {"pg": loss}, {**stats, **s}


@register_method("sdpo")
class SDPO(OnPolicyMethod):
    """On-policy self-distillation: the student (plain prompt) is pulled toward the self-teacher's
    (reprompt) next-token distribution at every completion token. With `blend_lambda` = lambda > 0
    the loss is a mix of two terms, (1 - lambda) * SDPO (a mean over distilled tokens) + lambda *
    GRPO (a mean over its loss_type's units, with the `grpo` config section)."""

    report = ("SDPO self-teacher", "how the self-teacher was built and how far the student was from it",
              ("sdpo/divergence", "sdpo/top1_agreement", "teacher/with_demo_frac", "teacher/feedback_only_frac"))

    @classmethod
    def sections(cls, cfg: MethodConfig) -> set[str]:
        return {"sdpo", "grpo"} if cfg.sdpo.blend_lambda > 0 else {"sdpo"}

    def __init__(self, cfg: MethodConfig, ctx: MethodContext, model):
        super().__init__(cfg, ctx, model)
        s = cfg.sdpo
        self.teacher = teacher_from_config(s, model, ctx.base, ctx.stage_steps)

    def make_batch(self, model, examples, generator):
        batch = super().make_batch(model, examples, generator)
        s, ctx, ro = self.cfg.sdpo, self.ctx, batch.rollout
        rep = build_reprompts(batch.examples, ro.texts, batch.verdicts, ro.group_ids.tolist(), s.reprompt,
                              ctx.prompt, ctx.tokenizer)
        batch.teacher_ids, batch.teacher_mask = encode_prompts(ctx.tokenizer, rep.texts, ctx.device)
        batch.distill = torch.tensor(rep.distill, dtype=torch.float32, device=ctx.device)
        batch.stats.update(rep.stats)
        if s.blend_lambda > 0:
            batch.advantages = self._advantages(batch)
        return batch

    def _distill_mask(self, batch: Batch) -> Tensor:
        return batch.rollout.completion_mask * batch.distill[:, None]

    def loss_terms(self, batch: Batch) -> dict[str, LossTerm]:
        lam = self.cfg.sdpo.blend_lambda
        if lam == 0:
            return {"sdpo": LossTerm(self._distill_mask(batch), "token")}
        return {"sdpo": LossTerm(self._distill_mask(batch), "token", scale=1 - lam), "grpo": self._grpo_term(batch, lam)}

    def loss_sums(self, model, batch: Batch) -> tuple[dict[str, Tensor], dict]:
        s, ro = self.cfg.sdpo, batch.rollout
        logits, logprobs, stats = self._student(model, batch)
        teacher_logits = self.teacher.logits(lambda m: ro.logits(m, batch.teacher_ids, batch.teacher_mask))
        mask = self._distill_mask(batch)
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        d = s.distillation
        if d.kind == "sampled_token":
            loss, sd = sdpo_token_loss(logprobs, gather_logprobs(teacher_logits, ro.completion_ids), mask,
                                       old_logprobs=old, is_clip=d.is_clip, reduction="sum")
        else:
            loss, sd = sdpo_loss(logits, teacher_logits, mask, divergence=d.divergence,
                                 alpha=d.jsd_alpha if d.divergence == "jsd" else None, top_k=d.top_k,
                                 add_tail=d.add_tail, top_k_from=d.top_k_from, temperature=d.temperature,
                                 sampled_logprobs=logprobs, old_logprobs=old, is_clip=d.is_clip, reduction="sum")
        stats.update({f"sdpo/{k}": v for k, v in sd.items()})
        if s.blend_lambda == 0:
            return {"sdpo": loss}, stats
        pg, ps = self._grpo_loss(logprobs, batch)
        stats.update({f"grpo/{k}": v for k, v in ps.items()})
        return {"sdpo": loss, "grpo": pg}, stats  # weighted 1 - lambda and lambda by their LossTerms

    def after_batch(self) -> None:
        self.teacher.update()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.teacher.load_state_dict(state)


@register_method("sft")
class SFT(Method):
    """Off-policy baseline: token cross-entropy on the reference solutions (and the warm-up, which
    runs it on its corpus of (prompt, completion) pairs: `batch_from_pairs`)."""

    def __init__(self, cfg: MethodConfig, ctx: MethodContext, model, *, entropy: bool = True):
        super().__init__(cfg, ctx, model)
        self.entropy = entropy
        """Log the token entropy (a full-vocabulary pass over the logits); the warm-up does not, and
        scores its rows in chunks as every no-grad scoring does (rollout.score_rows)."""

    @classmethod
    def examples_per_step(cls, cfg: MethodConfig, group_size: int) -> int:
        """As many sequences per step as the on-policy methods sample."""
        return cfg.prompts_per_step * group_size

    def make_batch(self, model, examples: list[Example], generator: torch.Generator | None) -> Batch:
        ctx = self.ctx
        prompts = [student_prompt(ctx.prompt, ex.question, ctx.tokenizer) for ex in examples]
        ro = rollout_from_texts(ctx.tokenizer, prompts, [ex.solution() for ex in examples], ctx.device)
        return Batch(list(examples), ro, stats={"response_length": float(ro.lengths.mean())})

    def batch_from_pairs(self, pairs: list[tuple[str, str]]) -> Batch:
        """A batch of given (prompt text, completion text) pairs (the warm-up corpus)."""
        ro = rollout_from_texts(self.ctx.tokenizer, [p for p, _ in pairs], [c for _, c in pairs], self.ctx.device)
        return Batch([], ro)

    def loss_terms(self, batch: Batch) -> dict[str, LossTerm]:
        return {"sft": LossTerm(batch.rollout.completion_mask, "token")}

    def loss_sums(self, model, batch: Batch) -> tuple[dict[str, Tensor], dict]:
        ro = batch.rollout
        if not self.entropy:
            loss, stats = sft_loss(ro.logprobs(model, batch_size=len(batch)), ro.completion_mask, reduction="sum")
            return {"sft": loss}, stats
        logits = ro.logits(model)
        loss, stats = sft_loss(gather_logprobs(logits, ro.completion_ids), ro.completion_mask, reduction="sum")
        stats["entropy"] = float(masked_mean(token_entropy(logits.detach()), ro.completion_mask))
        return {"sft": loss}, stats


def build_method(cfg: MethodConfig, ctx: MethodContext, model) -> Method:
    """The method `cfg.name` names, owning its state for a stage that trains `model`."""
    return METHODS[cfg.name](cfg, ctx, model)


def examples_per_step(cfg: MethodConfig, group_size: int) -> int:
    """Distinct examples the method `cfg.name` draws per step."""
    return METHODS[cfg.name].examples_per_step(cfg, group_size)
