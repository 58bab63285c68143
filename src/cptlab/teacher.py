"""The SDPO self-teacher: reprompt building and the teacher's weights (current, EMA, frozen,
trust-region).

The teacher is the same network reading a reprompt: the question, a successful sibling's completion
(the demonstration) and/or the verifier's feedback on the student's own attempt; the student's
completion is then scored token by token under that context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PromptConfig, SDPOConfig
from .lora import checkpoint_state_dict, copy_at_base, copy_sharing_base_weights, load_checkpoint_state
from .prompts import teacher_prompt
from .tasks import Example, Verdict
from .tasks.answer import format_answer


@dataclass
class Reprompts:
    texts: list[str]
    """One teacher prompt per sample (the plain student prompt where nothing is distilled)."""
    distill: list[bool]
    """Whether sample i takes part in the distillation loss."""
    stats: dict[str, float]


def _demo_text(completion: str, verdict: Verdict, content: str) -> str:
    if content == "answer_only" and verdict.answer is not None:
        return " " + format_answer(verdict.answer, verdict.answer_format)
    return completion


def build_reprompts(examples: list[Example], completions: list[str], verdicts: list[Verdict], group_ids: list[int],
                    cfg: SDPOConfig, pcfg: PromptConfig, tokenizer=None) -> Reprompts:
    """One teacher prompt per row; rows with the same group id are samples of the same example
    (examples[i] for row i) and so each other's siblings, taken in row order."""
    n = len(completions)
    siblings: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        siblings.setdefault(int(g), []).append(i)
    texts, distill = [], []
    counts = dict(with_demo=0, feedback_only=0, dropped=0, self_success=0)
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
        counts["self_success"] += verdict.reward >= cfg.success_threshold
        feedback = None
        if cfg.include_feedback and verdict.feedback and (demo is None or not cfg.feedback_only_without_solution):
            feedback = verdict.feedback
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


class Teacher:
    """The self-teacher's weights for a stage; `logits(forward)` scores reprompts with them.

    current: the student itself under no_grad (no copy); ema: a copy that `update()` moves toward the
    student, theta_T <- (1 - rate) theta_T + rate theta_S, called once per rollout batch after its
    updates (the SDPO method does); frozen: a copy kept as it is; trust_region: logits
    lerp(reference, current, mix_coef) with a frozen reference copy. `source` is where a copy starts:
    the stage's starting weights (the student now) or the base model (`base`, the stage's frozen
    reference); an EMA teacher starts there and then follows the student.
    """

    def __init__(self, mode: str, student, *, ema_rate: float = 0.05, mix_coef: float = 0.05, base=None,
                 source: str = "stage_start"):
        self.mode, self.ema_rate, self.mix_coef = mode, ema_rate, mix_coef
        self.student = student
        self.copy = None
        self._owns_copy = False
        if mode == "current":
            return
        if source == "base" and base is None:
            raise ValueError("Teacher: source='base' needs the base model")
        if source == "base" and mode != "ema":
            self.copy = base  # already a frozen eval-mode reference: no second copy
            return
        # with LoRA only the adapters are copied; the frozen base weights are shared
        self.copy = copy_sharing_base_weights(student) if source == "stage_start" else copy_at_base(student, base)
        self.copy.eval().requires_grad_(False)
        self._owns_copy = True

    @torch.no_grad()
    def logits(self, forward) -> torch.Tensor:
        """`forward(model) -> logits`; combines current and reference logits for trust_region."""
        if self.mode == "current":
            return forward(self.student).detach()
        if self.mode == "trust_region":
            ref = forward(self.copy)
            cur = forward(self.student)
            return torch.lerp(ref, cur, self.mix_coef).detach()
        return forward(self.copy).detach()

    @torch.no_grad()
    def update(self) -> None:
        """The teacher's step, once per rollout batch: EMA toward the student (other modes: nothing)."""
        if self.mode == "ema":
            ema_update(self.copy, self.student, self.ema_rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint must keep to resume the teacher (None: nothing, it is the student or base)."""
        return checkpoint_state_dict(self.copy) if self._owns_copy else None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_checkpoint_state(self.copy, state)


@torch.no_grad()
def ema_update(teacher, student, rate: float) -> None:
    """theta_T <- (1 - rate) * theta_T + rate * theta_S, parameter by parameter (buffers copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        if t is not s:  # LoRA copies share the frozen base weights with the student
            t.lerp_(s.detach().to(t.dtype), rate)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
