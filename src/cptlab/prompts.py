"""Prompt texts: the student's plain prompt and the self-teacher's reprompt, from one template set.

The warm-up corpus and the SDPO teacher both go through these functions, so the base model learns to
read demonstrations in exactly the layout the teacher will later show it.
"""

from __future__ import annotations

from .config import PromptConfig


def _wrap(cfg: PromptConfig, text: str, tokenizer=None) -> str:
    if cfg.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) + cfg.answer_prefix
    return text + cfg.answer_prefix


def student_prompt(cfg: PromptConfig, question: str, tokenizer=None) -> str:
    return _wrap(cfg, cfg.question_template.format(question=question), tokenizer)


def teacher_prompt(cfg: PromptConfig, question: str, solution: str | None, feedback: str | None,
                   tokenizer=None) -> str:
    """Reprompt: the question, then a demonstration and/or feedback, then the answer prefix."""
    text = cfg.reprompt_template.format(
        prompt=cfg.question_template.format(question=question),
        solution=cfg.solution_template.format(solution=solution) if solution else "",
        feedback=cfg.feedback_template.format(feedback=feedback) if feedback else "",
    )
    return _wrap(cfg, text, tokenizer)
