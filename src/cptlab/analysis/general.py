"""General-ability probe: what the base model could do before we trained it, beyond the task domains.

A pretrained base knows things our task domains never teach (facts, short instructions, common
phrases); continual post-training can erode them without any task accuracy showing it. The probe
(`src/cptlab/data/general_probe.json`: 48 fixed prompts and a paragraph of plain English, written for
cptlab) asks the base model once for its greedy answers, then scores the model after every stage:

  first_line_agreement  share of prompts whose greedy answer has the base's first line (normalised:
                        case, runs of whitespace and punctuation at either end ignored)
  token_agreement       share of the base answers' tokens that are the current model's top-1 token
                        there, teacher-forced on the base's answer (answers are MAX_NEW_TOKENS long)
  kl_to_base            mean per-token KL(base || current) over the full vocabulary, teacher-forced on
                        the base's answers (forward KL: where the base puts its mass, how much the
                        current model lost; unlike response/kl_to_base, which is measured on the
                        current model's own samples of the task prompts)
  text_ppl              perplexity of the fixed paragraph under the current model

The numbers are fields `general/<key>` of the stage-end `drift` record, not a record of their own: the
drift record already answers "how far has the model moved from the base", once per stage end with
stage 0 (the base, where agreement is 1 and KL 0) included, and report, compare and summary.json read
it stage by stage. So the probe runs where the drift record is written (eval.drift) and is switched by
eval.general_probe (on by default for models loaded from model.path, off for the tiny model, which
never had general ability).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from importlib import resources

import torch
from torch import Tensor

from ..losses import forward_kl, gather_logprobs, masked_sum
from ..rollout import Rollout, SamplingSpec, autocast, completion_logits, eval_mode, generate

MAX_NEW_TOKENS = 16
"""Greedy answer budget: the prompts ask for a word, a phrase or one sentence, and 16 tokens show
whether an answer changed. Generation dominates the probe's cost: for SmolLM2-135M on the 2-core CPU
dev box, 16 prompts x 32 tokens took 35-50 s of CPU time."""
LOGITS_ROWS = 8
"""Probe answers scored per forward: two [rows, 16, V] float logits tensors (25 MB each at V=49k)."""


def load_probe() -> tuple[list[str], str]:
    """(prompts, text) of the packaged probe."""
    data = json.loads((resources.files("cptlab") / "data" / "general_probe.json").read_text())
    return list(data["prompts"]), data["text"]


def render_prompt(prompt: str, tokenizer, use_chat_template: bool) -> str:
    """A probe prompt as a user would send it: through the tokenizer's chat template where the run uses
    one, else as 'Q: ...\nA:'. Not through the task prompt templates, which may ask for an answer
    format: the probe must read the same in runs whose task formats differ."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Q: {prompt}\nA:"


def normalize_first_line(text: str) -> str:
    """First non-empty line, lower-cased, whitespace collapsed, punctuation stripped at both ends."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return re.sub(r"\s+", " ", line).strip(" \t.,;:!?\"'()*").lower()


def first_line_agreement(base_texts: list[str], texts: list[str]) -> float:
    """Share of answers whose normalised first line equals the base's; NaN for empty lists."""
    if len(base_texts) != len(texts):
        raise ValueError(f"first_line_agreement: {len(base_texts)} base answers vs {len(texts)} answers")
    if not texts:
        return float("nan")
    return sum(normalize_first_line(a) == normalize_first_line(b) for a, b in zip(base_texts, texts)) / len(texts)


def text_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed negative log-likelihood of ids[1:] given their prefixes: logits [T, V], ids [T] -> scalar."""
    return -gather_logprobs(logits[None, :-1], ids[None, 1:]).sum()


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, max_len: int | None = None) -> float:
    """exp(mean NLL per predicted token) of `text`, in consecutive windows of at most `max_len` tokens
    (default: the model's max_position_embeddings), each read from its own start."""
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0].to(device)
    max_len = max_len or getattr(model.config, "max_position_embeddings", None) or len(ids)
    nll, count = 0.0, 0
    for start in range(0, len(ids), max_len):
        window = ids[start:start + max_len]
        if len(window) < 2:
            continue
        with autocast(model):
            logits = model(input_ids=window[None]).logits[0]
        nll += float(text_nll(logits, window))
        count += len(window) - 1
    return math.exp(nll / count) if count else float("nan")


@torch.no_grad()
def _teacher_forced(model, base_model, answers: Rollout) -> tuple[float, float]:
    """(mean KL(base || current), top-1 agreement) per token of the base's answers."""
    kl_sum = agree_sum = count = 0.0
    base_device = next(base_model.parameters()).device
    for start in range(0, answers.prompt_ids.shape[0], LOGITS_ROWS):
        rows = answers.select(slice(start, start + LOGITS_ROWS))
        parts = (rows.prompt_ids, rows.prompt_mask, rows.completion_ids, rows.completion_mask)
        logits = completion_logits(model, *parts)
        base_logits = completion_logits(base_model, *(p.to(base_device) for p in parts)).to(logits.device)
        kl = forward_kl(torch.log_softmax(logits, -1), torch.log_softmax(base_logits, -1))
        kl_sum += float(masked_sum(kl, rows.completion_mask))
        agree_sum += float(masked_sum((logits.argmax(-1) == rows.completion_ids).float(), rows.completion_mask))
        count += float(rows.completion_mask.sum())
    return (kl_sum / count, agree_sum / count) if count else (float("nan"), float("nan"))


@torch.no_grad()
def general_probe(model, base_model, tokenizer, prompts: list[str], text: str, spec: SamplingSpec, *,
                  base_answers: Rollout | None = None) -> tuple[dict[str, float], Rollout]:
    """The probe's numbers for `model` against `base_model` on `prompts` (already rendered), and the
    base's greedy answers (pass them back as `base_answers` to skip regenerating them next time).
    `spec` gives the engine and batch size; answers are greedy and capped at MAX_NEW_TOKENS."""
    spec = replace(spec, greedy=True, max_new_tokens=MAX_NEW_TOKENS)
    with eval_mode(model), eval_mode(base_model):
        if base_answers is None:
            base_answers = generate(base_model, tokenizer, prompts, spec)
        answers = generate(model, tokenizer, prompts, spec)
        kl, agreement = _teacher_forced(model, base_model, base_answers)
        ppl = text_perplexity(model, tokenizer, text)
    return {"first_line_agreement": first_line_agreement(base_answers.texts, answers.texts),
            "token_agreement": agreement, "kl_to_base": kl, "text_ppl": ppl}, base_answers
