"""Prompt texts: the student's plain prompt and the self-teacher's reprompt, from one template set.

The warm-up corpus and the SDPO teacher both go through these functions, so the base model learns to
read demonstrations in exactly the layout the teacher will later show it.

With `prompt.format_example` every prompt starts with one worked exchange on a neutral question (the
answer format's example, tasks/answer.py): a user turn and an assistant turn in the chat template, or a
question/answer pair in the plain layout. A prior exchange rather than a line in the instruction:
SmolLM2-135M-Instruct copied or answered an in-line example instead of the real question
(docs/domains.md, "Answer formats").
"""

from __future__ import annotations

from .config import PromptConfig
from .tasks.answer import get_format


def _example(cfg: PromptConfig) -> tuple[str, str] | None:
    """(question, answer) of the worked example, or None; the question is laid out like every
    full-style question: question_template around the question and the format's instruction."""
    if not cfg.format_example:
        return None
    fmt = get_format(cfg.answer_format)
    return cfg.question_template.format(question=f"{fmt.example_question}\n{fmt.instruction}"), fmt.example_answer


def _wrap(cfg: PromptConfig, text: str, tokenizer=None) -> str:
    example = _example(cfg)
    if cfg.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        turns = [] if example is None else [{"role": "user", "content": example[0]},
                                            {"role": "assistant", "content": example[1]}]
        return tokenizer.apply_chat_template([*turns, {"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) + cfg.answer_prefix
    if example is not None:
        text = f"{example[0]}{cfg.answer_prefix} {example[1]}\n{text}"
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
