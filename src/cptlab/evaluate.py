"""Evaluation on fixed held-out sets: greedy accuracy (strict and lenient), sampled accuracy (pass@1
over k samples), format compliance and mean response length, per domain."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import EvalConfig, PromptConfig
from .prompts import student_prompt
from .rollout import SamplingSpec, generate, make_generator
from .tasks import make_split, verify_batch


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
    per_prompt: list[int] = field(default_factory=list)
    """Greedy correctness of each held-out prompt (1/0), in eval-set order (for paired tests)."""
    sampled_hits: list[int] | None = None
    """Correct samples out of eval.num_samples for each prompt; None when no samples were drawn."""
    lenient_acc: float = float("nan")
    """Greedy accuracy when the right value counts without the right wrapper (>= greedy_acc)."""
    rows: list[dict] | None = None
    """One row per prompt: prompt, question, completion, answer, lenient_answer, correct,
    lenient_correct, well_formed, reward, feedback (for `cptlab eval --show` and samples/)."""
    verifier_errors: int = 0
    """Completions (greedy and sampled) on which the domain's verifier raised (scored 0)."""
    verifier_error: str = ""
    """The first such error's message."""
    answer_format: str = "tags"
    """The format the domain's prompts ask for (a data-set domain may have its own)."""

    def metrics(self) -> dict:
        return dict(greedy_acc=self.greedy_acc, lenient_acc=self.lenient_acc, sampled_acc=self.sampled_acc,
                    format_rate=self.format_rate, mean_length=self.mean_length, num_prompts=len(self.texts),
                    verifier_errors=self.verifier_errors)


def eval_prompts(domain: str, n: int, pcfg: PromptConfig, tokenizer=None) -> tuple[list, list[str]]:
    """(examples, prompts) of a domain's first n held-out questions, rendered exactly as the model reads
    them at evaluation: the run's style, answer format (its instruction) and template. Everything that
    shows a model the eval prompts (the evaluator, the domain distance) builds them here."""
    examples = make_split(domain, "eval", n, style=pcfg.style, answer_format=pcfg.answer_format)
    return examples, [student_prompt(pcfg, ex.question, tokenizer) for ex in examples]


def evaluate_domain(model, tokenizer, domain: str, ecfg: EvalConfig, pcfg: PromptConfig, spec: SamplingSpec, *,
                    seed: int = 0) -> DomainResult:
    """ecfg: a resolved eval section (config.resolve_eval: no nulls). spec: greedy decoding on the run's
    engine (SamplingSpec.for_eval); its `.sampled()` draws the k samples per prompt, from a generator
    seeded with `seed`."""
    if ecfg.max_new_tokens is None or ecfg.temperature is None or ecfg.save_samples is None:
        raise ValueError("evaluate_domain: resolve the eval section first (cptlab.config.resolve_eval)")
    examples, prompts = eval_prompts(domain, ecfg.num_prompts, pcfg, tokenizer)
    greedy = generate(model, tokenizer, prompts, spec.as_greedy())
    verdicts = verify_batch(examples, greedy.texts, pcfg.style)
    errors = [v.error for v in verdicts if v.error]
    n = len(examples)
    sampled_acc, sampled_hits = None, None
    if ecfg.num_samples > 0:
        device = next(model.parameters()).device
        sampled = generate(model, tokenizer, prompts, spec.sampled(), generator=make_generator(seed, device),
                           group_size=ecfg.num_samples)
        groups = sampled.group_ids.tolist()
        sampled_verdicts = verify_batch([examples[g] for g in groups], sampled.texts, pcfg.style)
        errors += [v.error for v in sampled_verdicts if v.error]
        hits = [v.correct for v in sampled_verdicts]
        sampled_acc = sum(hits) / len(hits)
        sampled_hits = [0] * n
        for g, hit in zip(groups, hits):
            sampled_hits[g] += int(hit)
    rows = [dict(prompt=prompt, question=ex.question, completion=text, answer=v.answer,
                 lenient_answer=v.lenient_answer, correct=v.correct, lenient_correct=v.lenient_correct,
                 well_formed=v.well_formed, reward=v.reward, feedback=v.feedback)
            for prompt, ex, text, v in zip(prompts, examples, greedy.texts, verdicts)]
    return DomainResult(domain, greedy_acc=sum(v.correct for v in verdicts) / n, sampled_acc=sampled_acc,
                        format_rate=sum(v.well_formed for v in verdicts) / n,
                        mean_length=float(greedy.lengths.mean()), samples=rows[: ecfg.save_samples],
                        texts=greedy.texts, lenient_acc=sum(v.lenient_correct for v in verdicts) / n, rows=rows,
                        per_prompt=[int(v.correct) for v in verdicts], sampled_hits=sampled_hits,
                        verifier_errors=len(errors), verifier_error=errors[0] if errors else "",
                        answer_format=examples[0].answer_format if examples else pcfg.answer_format)


def evaluate_all(model, tokenizer, domains: list[str], ecfg: EvalConfig, pcfg: PromptConfig, spec: SamplingSpec, *,
                 seed: int = 0, on_domain=None) -> dict[str, DomainResult]:
    results = {}
    for name in domains:
        results[name] = evaluate_domain(model, tokenizer, name, ecfg, pcfg, spec, seed=seed)
        if on_domain:
            on_domain(name)
    return results
