"""Response drift: how far the trained policy's outputs moved from the base model's.

`token_kl` and `answer_change_rate` are pure; `response_drift` runs both models on a prompt set
(sampled completions of the current policy for the KL and entropy, greedy completions of both for
the answers and lengths).
"""

from __future__ import annotations


import torch
from torch import Tensor

from ..losses import gather_logprobs, k3_kl, masked_mean, token_entropy
from ..rollout import SamplingSpec, completion_logits, eval_mode, generate, make_generator, score_rows
from ..tasks.answer import parse_answer


def token_kl(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor) -> float:
    """Monte-Carlo KL(current || base) per token: masked mean of lp - lp_base. [B, T] x3 -> float.

    Unbiased when the tokens were sampled from the current policy (at temperature 1); a single
    sample can be negative, the expectation cannot. 0.0 for an empty mask.
    """
    if not (logprobs.shape == base_logprobs.shape == mask.shape):
        raise ValueError(f"token_kl: logprobs {tuple(logprobs.shape)}, base_logprobs {tuple(base_logprobs.shape)} "
                         f"and mask {tuple(mask.shape)} must have one [B, T] shape")
    return float(masked_mean(logprobs.float() - base_logprobs.float(), mask))


def answer_change_rate(base_answers: list[str | None], answers: list[str | None]) -> float:
    """Fraction of prompts whose extracted answer differs (None = no answer; None vs None is equal).

    Answers are compared after stripping whitespace. NaN for empty lists.
    """
    if len(base_answers) != len(answers):
        raise ValueError(f"answer_change_rate: {len(base_answers)} base answers vs {len(answers)} answers")
    if not answers:
        return float("nan")

    def norm(a):
        return a.strip() if isinstance(a, str) else a

    return sum(norm(a) != norm(b) for a, b in zip(base_answers, answers)) / len(answers)


def _logits_stats(model, rollout, base_model, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(lp [N, C], lp_base [N, C], entropy [N, C]) of the rollout's tokens, chunked by `batch_size`."""
    lps, base_lps, entropies = [], [], []
    batch_size = score_rows(model, rollout.completion_ids.shape[1], batch_size)
    for start in range(0, rollout.prompt_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        parts = (rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.completion_ids[sl],
                 rollout.completion_mask[sl])
        logits = completion_logits(model, *parts)
        lps.append(gather_logprobs(logits, parts[2]))
        entropies.append(token_entropy(logits))
        device = next(base_model.parameters()).device
        base_logits = completion_logits(base_model, *(p.to(device) for p in parts))
        base_lps.append(gather_logprobs(base_logits, parts[2].to(device)).to(lps[-1].device))
    return torch.cat(lps), torch.cat(base_lps), torch.cat(entropies)


@torch.no_grad()
def response_samples(model, base_model, tokenizer, prompts: list[str], spec: SamplingSpec, *, seed: int,
                     answer_format: str = "tags") -> dict:
    """What `response_drift` computes its metrics from, per prompt (CPU tensors and lists, so that the
    parts of several ranks, each on its own prompts, concatenate with `merge_samples`): the current
    policy's samples at temperature 1 (a generator seeded with `seed`) with their log-probs under both
    models and their entropies, and both models' greedy answers and lengths."""
    device = next(model.parameters()).device
    with eval_mode(model), eval_mode(base_model):
        sampled = generate(model, tokenizer, prompts, spec.sampled(temperature=1.0),
                           generator=make_generator(seed, device))
        lp, lp_base, entropy = _logits_stats(model, sampled, base_model, spec.batch_size)
        greedy = generate(model, tokenizer, prompts, spec.as_greedy())
        base_greedy = generate(base_model, tokenizer, prompts, spec.as_greedy())
    return dict(
        lp=lp.cpu(), lp_base=lp_base.cpu(), entropy=entropy.cpu(), mask=sampled.completion_mask.cpu(),
        sampled_lengths=sampled.lengths.float().cpu(), lengths=greedy.lengths.float().cpu(),
        base_lengths=base_greedy.lengths.float().cpu(),
        answers=[parse_answer(t, answer_format).answer for t in greedy.texts],
        base_answers=[parse_answer(t, answer_format).answer for t in base_greedy.texts])


def merge_samples(parts: list[dict]) -> dict:
    """Several `response_samples` results (e.g. one per rank) as one: rows concatenated, the [N, C]
    tensors right-padded (mask 0) to the widest."""
    parts = [p for p in parts if p and len(p["answers"])]
    if not parts:
        return {}
    width = max(p["mask"].shape[1] for p in parts)

    def cat(key):
        xs = [p[key] for p in parts]
        if xs[0].dim() == 2:
            xs = [torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in xs]
        return torch.cat(xs)

    out = {k: cat(k) for k, v in parts[0].items() if isinstance(v, Tensor)}
    for key in ("answers", "base_answers"):
        out[key] = [a for p in parts for a in p[key]]
    return out


def drift_metrics(samples: dict) -> dict[str, float]:
    """response_drift's metrics from `response_samples` (NaN everywhere for no prompts)."""
    if not samples or not len(samples["answers"]):
        nan = float("nan")
        return dict(kl_to_base=nan, kl_to_base_k3=nan, entropy=nan, sampled_mean_length=nan,
                    answer_changed_frac=nan, mean_length=nan, base_mean_length=nan)
    lp, lp_base, mask = samples["lp"], samples["lp_base"], samples["mask"]
    return {
        "kl_to_base": token_kl(lp, lp_base, mask),
        "kl_to_base_k3": float(masked_mean(k3_kl(lp, lp_base), mask)),
        "entropy": float(masked_mean(samples["entropy"], mask)),
        "sampled_mean_length": float(samples["sampled_lengths"].mean()),
        "answer_changed_frac": answer_change_rate(samples["base_answers"], samples["answers"]),
        "mean_length": float(samples["lengths"].mean()),
        "base_mean_length": float(samples["base_lengths"].mean()),
    }


def response_drift(model, base_model, tokenizer, prompts: list[str], spec: SamplingSpec, *,
                   seed: int, answer_format: str = "tags") -> dict[str, float]:
    """Drift of `model`'s responses from `base_model`'s on `prompts` (already rendered), sampled with
    `spec` (its budget and engine; the samples at temperature 1 from a generator seeded with `seed`);
    answers are read in `answer_format` (tasks/answer.py).

    Keys:
      kl_to_base           per-token KL(current || base), token_kl on the current policy's samples
                           (temperature 1, `seed`)
      kl_to_base_k3        the same with Schulman's k3 estimator (non-negative, lower variance)
      entropy              mean per-token entropy of the current policy on its samples
      sampled_mean_length  mean length (tokens, EOS included) of those samples
      answer_changed_frac  fraction of prompts whose greedy answer differs between base and current
      mean_length, base_mean_length   mean greedy completion length (tokens) of current and base
    """
    if not prompts:
        return drift_metrics({})
    return drift_metrics(response_samples(model, base_model, tokenizer, prompts, spec, seed=seed,
                                                  answer_format=answer_format))
