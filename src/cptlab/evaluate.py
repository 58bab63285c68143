"""Evaluation on fixed held-out sets: greedy accuracy (strict and lenient), sampled accuracy (pass@1
over k samples), format compliance and mean response length, per domain."""

from __future__ import annotations

from dataclasses import dataclass

from .config import EvalConfig, PromptConfig
from .prompts import student_prompt
from .rollout import generate
from .tasks import make_split, verify


@dataclass
class DomainResult:
    domain: str
    greedy_acc: float
    sampled_acc: float | None
    format_rate: float
    mean_length: float
    samples: list[dict]
    """The first eval.save_samples rows of `rows` (what samples/ keeps)."""
    texts: list[str]
    """Every greedy completion (for artifact analysis)."""
    lenient_acc: float = float("nan")
    """Greedy accuracy when the right value counts without the right wrapper (>= greedy_acc)."""
    rows: list[dict] | None = None
    """One row per prompt: prompt, question, completion, answer, lenient_answer, correct,
    lenient_correct, well_formed (for `cptlab eval --show`)."""

    def metrics(self) -> dict:
        return dict(greedy_acc=self.greedy_acc, lenient_acc=self.lenient_acc, sampled_acc=self.sampled_acc,
                    format_rate=self.format_rate, mean_length=self.mean_length, num_prompts=len(self.texts))


def evaluate_domain(model, tokenizer, domain: str, ecfg: EvalConfig, pcfg: PromptConfig, *,
                    batch_size: int = 256, seed: int = 0, engine: str = "auto", cuda_graphs: bool = True) -> DomainResult:
    """ecfg: a resolved eval section (config.resolve_eval: no nulls). engine / cuda_graphs: the rollout
    engine (rollout.generate), as the run's rollout section sets it."""
    if ecfg.max_new_tokens is None or ecfg.temperature is None or ecfg.save_samples is None:
        raise ValueError("evaluate_domain: resolve the eval section first (cptlab.config.resolve_eval)")
    gen = dict(batch_size=batch_size, engine=engine, cuda_graphs=cuda_graphs)
    examples = make_split(domain, "eval", ecfg.num_prompts, style=pcfg.style, answer_format=pcfg.answer_format)
    prompts = [student_prompt(pcfg, ex.question, tokenizer) for ex in examples]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=ecfg.max_new_tokens, greedy=True, **gen)
    verdicts = [verify(ex, text, pcfg.style) for ex, text in zip(examples, greedy.texts)]
    n = len(examples)
    sampled_acc = None
    if ecfg.num_samples > 0:
        k = ecfg.num_samples
        sampled = generate(model, tokenizer, [p for p in prompts for _ in range(k)],
                           max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, seed=seed, **gen)
        hits = [verify(examples[i // k], t, pcfg.style).correct for i, t in enumerate(sampled.texts)]
        sampled_acc = sum(hits) / len(hits)
    rows = [dict(prompt=prompt, question=ex.question, completion=text, answer=v.answer,
                 lenient_answer=v.lenient_answer, correct=v.correct, lenient_correct=v.lenient_correct,
                 well_formed=v.well_formed)
            for prompt, ex, text, v in zip(prompts, examples, greedy.texts, verdicts)]
    return DomainResult(domain, greedy_acc=sum(v.correct for v in verdicts) / n, sampled_acc=sampled_acc,
                        format_rate=sum(v.well_formed for v in verdicts) / n,
                        mean_length=float(greedy.lengths.mean()), samples=rows[: ecfg.save_samples],
                        texts=greedy.texts, lenient_acc=sum(v.lenient_correct for v in verdicts) / n, rows=rows)


def evaluate_all(model, tokenizer, domains: list[str], ecfg: EvalConfig, pcfg: PromptConfig, *,
                 batch_size: int = 256, seed: int = 0, on_domain=None, engine: str = "auto",
                 cuda_graphs: bool = True) -> dict[str, DomainResult]:
    results = {}
    for name in domains:
        results[name] = evaluate_domain(model, tokenizer, name, ecfg, pcfg, batch_size=batch_size, seed=seed,
                                        engine=engine, cuda_graphs=cuda_graphs)
        if on_domain:
            on_domain(name)
    return results
