"""The SDPO self-teacher: reprompt building and the teacher's weights (a registry of modes: current,
ema, frozen, trust_region, stable, stable_ema).

The teacher is the same network reading a reprompt: the question, a successful sibling's completion
(the demonstration, its thinking removed) and/or the verifier's feedback on the student's own
attempt; the student's completion is then scored token by token under that context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import PromptConfig, RepromptConfig, SDPOConfig
from .variants import (checkpoint_state_dict, copy_at_base, copy_sharing_base_weights, load_checkpoint_state,
                       variant_of)
from .prompts import teacher_prompt
from .tasks import Example, Verdict
from .tasks.answer import format_answer
from .verifiers import cap


@dataclass
class Reprompts:
    texts: list[str]
    """One teacher prompt per sample (the plain student prompt where nothing is distilled)."""
    distill: list[bool]
    """Whether sample i takes part in the distillation loss."""
    stats: dict[str, float]


_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def remove_thinking(text: str) -> str:
    """`text` without its thinking, as the reference strips it from demonstrations: every
    <think>...</think> block and the whitespace after it (lasgroup/SDPO; TRL likewise), then
    everything up to and including a remaining </think> and the whitespace after it (SDPO-CL: a
    thinking model whose chat template opens the block in the prompt emits only the closing tag).
    Text without a closing tag is returned unchanged (an unclosed <think> included, as there)."""
    text = _THINK_BLOCK.sub("", text)
    _, closing, answer = text.partition("</think>")
    return answer.lstrip() if closing else text


def _demo_text(completion: str, verdict: Verdict, content: str) -> str:
    if content == "answer_only" and verdict.answer is not None:
        return " " + format_answer(verdict.answer, verdict.answer_format)
    return completion


def build_reprompts(examples: list[Example], completions: list[str], verdicts: list[Verdict], group_ids: list[int],
                    cfg: RepromptConfig, pcfg: PromptConfig, tokenizer=None) -> Reprompts:
    """One teacher prompt per row; rows with the same group id are samples of the same example
    (examples[i] for row i) and so each other's siblings, taken in row order."""
    n = len(completions)
    siblings: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        siblings.setdefault(int(g), []).append(i)
    texts, distill = [], []
    counts = dict(with_demo=0, feedback_only=0, dropped=0, self_success=0, thinking_removed=0)
    for i in range(n):
        ex, verdict = examples[i], verdicts[i]
        demo = None
        if cfg.demo_source == "sibling":
            for j in siblings[int(group_ids[i])]:
                if j == i and cfg.skip_self_success:
                    continue
                if verdicts[j].reward >= cfg.success_threshold:
                    demo = _demo_text(completions[j], verdicts[j], cfg.demo_content)
                    break  # the first success, as the reference does (batch order is random)
        elif cfg.demo_source == "reference":
            demo = ex.solution(cfg.demo_content)
        if demo is not None and cfg.remove_thinking:
            stripped = remove_thinking(demo)
            counts["thinking_removed"] += stripped != demo
            demo = stripped
        counts["self_success"] += verdict.reward >= cfg.success_threshold
        feedback = None
        if cfg.include_feedback and verdict.feedback and (demo is None or not cfg.feedback_only_without_solution):
            feedback = cap(verdict.feedback, cfg.feedback_max_chars)
        if demo is None and (cfg.no_demo == "skip" or feedback is None):
            texts.append(teacher_prompt(pcfg, ex.question, None, None, tokenizer))
            distill.append(False)
            counts["dropped"] += 1
            continue
        texts.append(teacher_prompt(pcfg, ex.question, demo, feedback, tokenizer))
        distill.append(True)
        counts["with_demo" if demo is not None else "feedback_only"] += 1
    stats = {f"teacher/{k}_frac": v / max(1, n) for k, v in counts.items()}
    return Reprompts(texts, distill, stats)


def restart_points(steps: int, every: int, at: list[float]) -> frozenset[int]:
    """The batch counts k, 0 < k < steps, after which a stable teacher is rebuilt: every `every`
    batches (0: never) and after round(f * steps) batches for each fraction f in `at` (the nearest
    step, not the floor: 0.29 * 100 is 28.999... in floating point). The build at the stage start is
    not among them, nor a restart after the last batch (no step would use it)."""
    points = set(range(every, steps, every)) if every > 0 else set()
    points.update(round(f * steps) for f in at)
    return frozenset(k for k in points if 0 < k < steps)


class Teacher:
    """The self-teacher's weights for a stage; `logits(forward)` scores reprompts with them. One
    subclass per `sdpo.teacher.mode`, registered by name (TEACHERS, `register_teacher`); `make_teacher`
    builds one, `teacher_from_config` from a method's SDPO section.

    A copy starts at `source`: the stage's starting weights (the student now) or the base model (`base`,
    the stage's frozen reference). With LoRA only the adapters are copied; the base weights are shared.
    What a checkpoint keeps (`state_dict`): `teacher`, the copy's weights where the teacher owns one;
    a stable teacher also `teacher_schedule` and `teacher_anchor`.
    """

    mode = ""

    def __init__(self, student, *, base=None):
        self.student, self.base = student, base
        self.copy = None
        self._owns_copy = False
        self.batches = 0  # rollout batches that updated the student this stage (a restart clock)

    @classmethod
    def from_config(cls, s: SDPOConfig, student, base, stage_steps: int) -> "Teacher":
        """The teacher the SDPO config section describes, for a stage of `stage_steps` batches."""
        return cls(student, base=base)

    def _make_copy(self, source: str) -> None:
        """A frozen copy of the student (stage_start) or of the student's architecture at the base."""
        if source == "base" and self.base is None:
            raise ValueError("Teacher: source='base' needs the base model")
        self.copy = copy_sharing_base_weights(self.student) if source == "stage_start" \
            else copy_at_base(self.student, self.base)
        self.copy.eval().requires_grad_(False)
        self._owns_copy = True

    def _owned(self):
        """(name, teacher tensor, student tensor) for every parameter the copy does not share with the
        student (all of them, or the adapters with LoRA)."""
        for (name, t), s in zip(self.copy.named_parameters(), self.student.parameters()):
            if t is not s:
                yield name, t, s

    @torch.no_grad()
    def logits(self, forward) -> torch.Tensor:
        """`forward(model) -> logits` under the teacher's weights, detached."""
        return forward(self.copy).detach()

    @torch.no_grad()
    def update(self) -> None:
        """The teacher's step, once per rollout batch that updated the student (the SDPO method calls
        it after the batch's updates)."""
        self.batches += 1

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint must keep to resume the teacher, name -> tensors."""
        return {"teacher": checkpoint_state_dict(self.copy)} if self._owns_copy else {}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what `state_dict` gave (ValueError naming what does not fit)."""
        if "teacher" in state:
            load_checkpoint_state(self.copy, state["teacher"])


TEACHERS: dict[str, type[Teacher]] = {}


def register_teacher(mode: str):
    """Class decorator: the teacher of `sdpo.teacher.mode = mode` (its settings: sdpo.teacher.<mode>)."""

    def wrap(cls: type[Teacher]) -> type[Teacher]:
        cls.mode = mode
        TEACHERS[mode] = cls
        return cls

    return wrap


def make_teacher(mode: str, student, **settings) -> Teacher:
    """The teacher of mode `mode` over `student`, with its own settings (base=..., ema_rate=..., ...)."""
    if mode not in TEACHERS:
        raise ValueError(f"teacher mode {mode!r}: expected one of {', '.join(TEACHERS)}")
    return TEACHERS[mode](student, **settings)


def teacher_from_config(s: SDPOConfig, student, base, stage_steps: int) -> Teacher:
    return TEACHERS[s.teacher.mode].from_config(s, student, base, stage_steps)


@register_teacher("current")
class CurrentTeacher(Teacher):
    """The student itself under no_grad: no copy, the fastest-moving teacher."""

    @torch.no_grad()
    def logits(self, forward) -> torch.Tensor:
        return forward(self.student).detach()


@register_teacher("ema")
class EMATeacher(Teacher):
    """A copy that follows the student, theta_T <- (1 - rate) theta_T + rate theta_S, once per rollout
    batch after its updates (the reference's default, rate 0.05); it starts at `source`."""

    def __init__(self, student, *, base=None, ema_rate: float = 0.05, source: str = "stage_start"):
        super().__init__(student, base=base)
        self.ema_rate = ema_rate
        self._make_copy(source)

    @classmethod
    def from_config(cls, s, student, base, stage_steps):
        return cls(student, base=base, ema_rate=s.teacher.ema.rate, source=s.teacher.ema.source)

    @torch.no_grad()
    def update(self) -> None:
        super().update()
        ema_update(self.copy, self.student, self.ema_rate)


@register_teacher("frozen")
class FrozenTeacher(Teacher):
    """A copy kept as it is: the stage's starting weights, or the base (then the base itself, which is
    already a frozen reference: no second copy)."""

    def __init__(self, student, *, base=None, source: str = "stage_start"):
        super().__init__(student, base=base)
        if source == "base":
            if base is None:
                raise ValueError("Teacher: source='base' needs the base model")
            self.copy = base
        else:
            self._make_copy(source)

    @classmethod
    def from_config(cls, s, student, base, stage_steps):
        return cls(student, base=base, source=s.teacher.frozen.source)


@register_teacher("trust_region")
class TrustRegionTeacher(FrozenTeacher):
    """Logits lerp(reference, current, mix_coef): a frozen reference (as a frozen teacher's) pulled
    toward the student's own logits (the reference implementation's alternative to EMA)."""

    def __init__(self, student, *, base=None, source: str = "stage_start", mix_coef: float = 0.05):
        super().__init__(student, base=base, source=source)
        self.mix_coef = mix_coef

    @classmethod
    def from_config(cls, s, student, base, stage_steps):
        tr = s.teacher.trust_region
        return cls(student, base=base, source=tr.source, mix_coef=tr.mix_coef)

    @torch.no_grad()
    def logits(self, forward) -> torch.Tensor:
        ref = forward(self.copy)
        cur = forward(self.student)
        return torch.lerp(ref, cur, self.mix_coef).detach()


@register_teacher("stable")
class StableTeacher(Teacher):
    """StableSDPO, our restart-and-freeze reading (docs/concepts.md, "Teachers"): a copy set by `restart()` to
    theta_T = (1 - gamma) * theta_anchor + gamma * theta_S, now (the stage start) and after each count
    of updating batches in `restart_after`, frozen in between. `anchor`: "base" (the base model) or
    "stage_start" (the student's weights now, kept for the restarts). With LoRA only the adapters are
    mixed: with the base anchor that is exact (A from the student, B scaled by gamma: W0 + gamma *
    (alpha / r) * B A), with the stage-start anchor it mixes A and B separately, which is not the mix
    of the merged weights (B A is bilinear)."""

    def __init__(self, student, *, base=None, gamma: float = 0.4, anchor: str = "base",
                 restart_after: frozenset[int] = frozenset()):
        super().__init__(student, base=base)
        self.anchor: dict[str, torch.Tensor] | None = None  # stage_start: name -> each owned tensor
        if anchor == "base" and base is None and variant_of(student).needs_base_for_anchor():
            raise ValueError("Teacher: anchor='base' needs the base model")
        self.gamma, self.anchor_kind = gamma, anchor
        self.restart_after = frozenset(restart_after)
        self._make_copy("stage_start")
        if anchor == "stage_start":
            self.anchor = {name: t.detach().clone() for name, t, _ in self._owned()}  # the copy is the student now
        self.restart()
        if not self.restart_after:
            self.anchor = None  # no restart will read it: do not hold a second copy of the weights for nothing

    @classmethod
    def from_config(cls, s, student, base, stage_steps):
        st = s.teacher.stable
        return cls(student, base=base, gamma=st.gamma, anchor=st.anchor,
                   restart_after=restart_points(stage_steps, st.restart_every, st.restart_at))

    @torch.no_grad()
    def restart(self) -> None:
        """theta_T <- (1 - gamma) * theta_anchor + gamma * theta_S (buffers copied)."""
        variant = variant_of(self.student)
        base = dict(self.base.named_parameters()) if self.anchor_kind == "base" and self.base is not None else {}
        for name, t, s in self._owned():
            s = s.detach().to(t.dtype)
            # a LoRA student's base anchor is its adapters with B zeroed (variants.LoRA.anchor)
            anchor = self.anchor[name] if self.anchor_kind == "stage_start" else variant.anchor(name, s, base)
            t.copy_(torch.lerp(anchor.to(t.dtype), s, self.gamma))
        for t, s in zip(self.copy.buffers(), self.student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def update(self) -> None:
        super().update()
        if self.batches in self.restart_after:
            self.restart()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Also `teacher_schedule`, the restart clock, and `teacher_anchor`, the stage-start anchor while
        a restart will read it (the student has moved on from it by a mid-stage checkpoint)."""
        state = {**super().state_dict(), "teacher_schedule": {"batches": torch.tensor(self.batches, dtype=torch.int64)}}
        if self.anchor is not None:
            state["teacher_anchor"] = self.anchor
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        super().load_state_dict(state)
        if "teacher_schedule" in state:
            self.batches = int(state["teacher_schedule"]["batches"])
        if self.anchor is not None:
            saved = state.get("teacher_anchor", {})
            if saved.keys() != self.anchor.keys():
                raise ValueError(f"teacher anchor: {len(saved)} tensors, expected {len(self.anchor)}")
            for name, t in self.anchor.items():
                t.copy_(saved[name])


@register_teacher("stable_ema")
class StableEMATeacher(StableTeacher):
    """StableSDPO as its authors' code runs it (SDPO-CL `fsdp_workers.py`): the teacher is mixed once at
    the stage start, (1 - gamma) * theta_anchor + gamma * theta_S, then follows the student as an EMA
    at `ema_rate` (frozen only if the rate is 0); no restarts."""

    def __init__(self, student, *, base=None, gamma: float = 0.4, anchor: str = "base", ema_rate: float = 0.05):
        super().__init__(student, base=base, gamma=gamma, anchor=anchor)
        self.ema_rate = ema_rate

    @classmethod
    def from_config(cls, s, student, base, stage_steps):
        st = s.teacher.stable_ema
        return cls(student, base=base, gamma=st.gamma, anchor=st.anchor, ema_rate=st.rate)

    @torch.no_grad()
    def update(self) -> None:
        self.batches += 1
        if self.ema_rate > 0:
            ema_update(self.copy, self.student, self.ema_rate)


@torch.no_grad()
def ema_update(teacher, student, rate: float) -> None:
    """theta_T <- (1 - rate) * theta_T + rate * theta_S, parameter by parameter (buffers copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        if t is not s:  # LoRA copies share the frozen base weights with the student
            t.lerp_(s.detach().to(t.dtype), rate)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
