"""Warm-up SFT: turns a random tiny model into a base model with prior capabilities (or, with
`warmup.pretrained`, teaches a loaded model the run's answer format on domains no stage trains).

The corpus mixes plain (prompt -> reference solution) examples with *reprompted* ones: the prompt,
then a demonstration and/or verifier feedback in the self-teacher layout, then the solution. Real LLMs
use in-context demonstrations out of the box; a tiny model only does if it saw them, and the SDPO
self-teacher depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import torch

from .config import Config
from .errors import NumericalFault
from .optim import lr_factor, make_optimizer
from .prompts import student_prompt, teacher_prompt
from .step import train_step
from .tasks import Example, all_domain_names, get_domain, make_split, train_pool_size, verify_batch
from .tasks.answer import format_answer
from .verifiers import cap
from .ui import progress


def warmup_corpus(cfg: Config, seed: int, tokenizer=None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs over the warm-up domains, shuffled. With a tokenizer, prompts are laid
    out as the run will show them (its chat template where prompt.use_chat_template is set)."""
    w, p = cfg.warmup, cfg.prompt
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    sizes = {d: w.examples_per_domain for d in w.domains}
    for d in w.domains:
        ood = f"{d}_ood"
        # a data set's variant held out for evaluation only (eval_source) has nothing to warm up on
        if w.ood_fraction > 0 and ood in all_domain_names() and ood not in sizes and train_pool_size(ood, 1) > 0:
            sizes[ood] = max(1, round(w.examples_per_domain * w.ood_fraction))
    for domain, size in sizes.items():
        examples = make_split(domain, "train", size, seed=seed, style=p.style, answer_format=p.answer_format)
        pending: list[tuple[int, Example, str]] = []  # a data set's feedback comes from its verifier, below
        for ex in examples:
            target = ex.solution()
            if rng.random() >= w.reprompt_fraction:
                pairs.append((student_prompt(p, ex.question, tokenizer), target))
                continue
            if rng.random() < 0.7:  # demonstration (full or answer-only, as the CoT experiment varies)
                demo = ex.solution("answer_only" if rng.random() < 0.3 else "full")
                pairs.append((teacher_prompt(p, ex.question, demo, None, tokenizer), target))
            else:  # feedback on a wrong answer borrowed from another example of the domain
                wrong = rng.choice(examples).answer
                if wrong == ex.answer:
                    wrong = ex.answer + "0"
                if get_domain(domain).dataset is not None:
                    pending.append((len(pairs), ex, wrong))
                    pairs.append(("", target))
                else:
                    pairs.append((teacher_prompt(p, ex.question, None, f"answer {wrong} is wrong", tokenizer), target))
        if pending:  # what the verifier says about the borrowed answer, as the self-teacher will read it
            verdicts = verify_batch([ex for _, ex, _ in pending],
                                    [format_answer(wrong, ex.answer_format) for _, ex, wrong in pending], p.style)
            for (i, ex, wrong), v in zip(pending, verdicts):
                feedback = cap(v.feedback or f"answer {wrong} is wrong", cfg.method.sdpo.reprompt.feedback_max_chars)
                pairs[i] = (teacher_prompt(p, ex.question, None, feedback, tokenizer), pairs[i][1])
    rng.shuffle(pairs)
    return pairs


def run_warmup(model, tokenizer, cfg: Config, device: torch.device, seed: int) -> list[float]:
    """SFT on the warm-up corpus through the one training step (the SFT method, this process alone:
    the warm-up runs on rank 0 while the others wait); returns the loss curve (one value per step)."""
    from .config import MethodConfig
    from .methods import SFT, MethodContext

    w = cfg.warmup
    corpus = warmup_corpus(cfg, seed, tokenizer)
    sft = SFT(MethodConfig(name="sft", lr=w.lr, weight_decay=w.weight_decay, grad_clip=1.0),
              MethodContext(tokenizer, cfg.prompt, cfg.rollout, device), model, entropy=False)
    optimizer = make_optimizer(model, w.lr, w.weight_decay)
    # plain random batches: sorting batches by length (less padding) trained far worse (measured)
    rng = random.Random(seed + 1)
    losses = []
    model.train()
    with progress("warm-up SFT", w.steps) as advance:
        for step in range(w.steps):
            batch = sft.batch_from_pairs(rng.sample(corpus, min(w.batch_size, len(corpus))))
            try:
                result = train_step(sft, model, optimizer, batch, grad_clip=1.0, local=True,
                                    lr=w.lr * lr_factor(step, w.steps, w.warmup_steps, "cosine"))
            except NumericalFault as fault:  # never cache (or train from) a broken base model
                raise NumericalFault(f"warm-up step {step + 1} of {w.steps}: {fault} (lower warmup.lr, now "
                                     f"{w.lr:g})") from None
            losses.append(result.loss)
            advance(info=f"loss {losses[-1]:.3f}")
    model.zero_grad(set_to_none=True)  # no stale gradients on weights that LoRA later freezes
    model.eval()
    return losses


def warmup_seed(cfg: Config) -> int:
    """The base model's seed: warmup.seed, or run.seed where that is null."""
    return cfg.run.seed if cfg.warmup.seed is None else cfg.warmup.seed


def base_model_key(cfg: Config, source: str | None = None) -> str:
    """Hash of everything that determines the warmed-up base model; `source` identifies the weights it
    started from when those were loaded (model.path: the sha256 of the loaded weights)."""
    # adapters come after the base; the GGUF cache only concerns model.path (and must not move old keys)
    # and activation checkpointing changes memory, not values
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("lora", "gguf_cache_dir", "gradient_checkpointing")}
    prompt = asdict(cfg.prompt)
    for key, default in (("answer_format", "tags"), ("format_example", False)):
        if prompt[key] == default:  # keys added later count only when set, so cached base models stay valid
            del prompt[key]
    parts = dict(model=model, warmup={k: v for k, v in asdict(cfg.warmup).items() if k not in ("cache_dir", "seed")},
                 prompt=prompt, seed=warmup_seed(cfg), version=1)
    if source is not None:
        parts["source"] = source
    if cfg.domains:  # changed generator settings change the warm-up corpus
        parts["domains"] = {name: asdict(spec) for name, spec in cfg.domains.items()}
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cfg: Config, source: str | None = None) -> Path | None:
    if not cfg.warmup.cache_dir:
        return None
    return Path(os.path.expanduser(cfg.warmup.cache_dir)) / base_model_key(cfg, source)


def store_in_cache(model, tokenizer, path: Path, info: dict) -> None:
    """Save atomically (see save_model); warmup.json says how the base model was made."""
    from .models import save_model

    save_model(model, tokenizer, path)
    (path / "warmup.json").write_text(json.dumps(info, indent=1))
