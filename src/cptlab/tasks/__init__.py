"""Task domains: registry, disjoint train/eval splits, rendering and verification.

`make_split(name, "eval", n)` is a fixed held-out set; `make_split(name, "train", n, seed)` draws from
another seed and drops any question that is in the domain's eval pool, so the two never overlap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .answer import format_answer, parse_answer
from .domains import BUILTIN, Domain

EVAL_POOL = 512
"""Size of each domain's held-out pool; eval sets are its prefixes, train never draws from it."""

_REGISTRY: dict[str, Domain] = {d.name: d for d in BUILTIN}
_FULL_INSTRUCTION = "\nGive your final answer inside <answer></answer>."


def all_domain_names() -> list[str]:
    return list(_REGISTRY)


def check_domain(name: str, field: str) -> Domain:
    if name not in _REGISTRY:
        raise ConfigError(field, name, "a domain (one of " + ", ".join(_REGISTRY) + ")")
    return _REGISTRY[name]


def get_domain(name: str) -> Domain:
    return check_domain(name, "domain")


@dataclass(frozen=True)
class Example:
    domain: str
    question: str
    reasoning: str
    answer: str
    entry: dict[str, Any]

    def solution(self, content: str = "full") -> str:
        """Reference completion: ' <reasoning> <answer>X</answer>' (answer_only drops the reasoning)."""
        if content == "answer_only" or not self.reasoning:
            return " " + format_answer(self.answer)
        return f" {self.reasoning} {format_answer(self.answer)}"


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _render(domain: Domain, entry: dict, style: str) -> Example:
    if style == "full":
        return Example(domain.name, entry["question"] + _FULL_INSTRUCTION, "", str(entry["answer"]), entry)
    return Example(domain.name, domain.compact_question(entry), domain.compact_reasoning(entry),
                   domain.compact_answer(entry), entry)


def _generate(domain: Domain, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(domain.task, size=size, seed=seed, **domain.task_config)
    return [dataset[i] for i in range(size)]


@functools.lru_cache(maxsize=64)
def _eval_pool(name: str) -> tuple[dict, ...]:
    return tuple(_generate(get_domain(name), EVAL_POOL, _seed(name, "eval")))


def make_split(name: str, split: str, n: int, seed: int = 0, style: str = "compact") -> list[Example]:
    """n examples of domain `name`; split 'eval' is fixed, 'train' depends on `seed`."""
    domain = get_domain(name)
    if split == "eval":
        if n > EVAL_POOL:
            raise ConfigError("eval.num_prompts", n, f"at most {EVAL_POOL}")
        return [_render(domain, e, style) for e in _eval_pool(name)[:n]]
    held_out = {_render(domain, e, "compact").question for e in _eval_pool(name)}
    out: list[Example] = []
    chunk = 0
    while len(out) < n:
        for entry in _generate(domain, max(256, n), _seed(name, "train", seed, chunk)):
            if _render(domain, entry, "compact").question not in held_out:
                out.append(_render(domain, entry, style))
        chunk += 1
        if chunk > 50 and not out:
            raise RuntimeError(f"domain {name}: every generated training question is in the eval pool")
    return out[:n]


@functools.lru_cache(maxsize=256)
def eval_set_identity(name: str, n: int, style: str = "compact") -> dict[str, Any]:
    """What makes two evaluations of `name` comparable prompt by prompt: the prompt count, a sha256 of the
    generator config (reasoning-gym task, its config, the held-out pool's seed and size, the prompt
    style) and a sha256 of the prompts and reference answers themselves."""
    domain = get_domain(name)
    config = dict(task=domain.task, task_config=domain.task_config, pool_seed=_seed(name, "eval"),
                  pool_size=EVAL_POOL, style=style)
    examples = make_split(name, "eval", n, style=style)
    content = json.dumps([[ex.question, ex.answer] for ex in examples], separators=(",", ":"))
    return {"prompts": n,  # cached: callers must not mutate it
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "prompts_sha256": hashlib.sha256(content.encode()).hexdigest()}


@dataclass(frozen=True)
class Verdict:
    reward: float
    correct: bool
    well_formed: bool
    answer: str | None
    feedback: str
    """Short textual feedback for the self-teacher ('' when correct)."""


@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
    """reasoning-gym's scorer for a task, built once: building it instantiates the task's dataset
    (25 ms for spell_backward, which loads a word list), far more than scoring one answer (0.3 us)."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def verify(example: Example, completion: str, style: str = "compact") -> Verdict:
    """Score a completion with reasoning-gym's verifier; reward 1 if correct, else 0."""
    domain = get_domain(example.domain)
    parsed = parse_answer(completion)
    if parsed.answer is None:
        return Verdict(0.0, False, False, None, "no answer inside <answer></answer>")
    text = parsed.answer if style == "full" else domain.to_verifier(parsed.answer)
    try:
        score = float(_score_fn(domain.task)(text, example.entry))
    except Exception:  # a verifier crash on odd text is a wrong answer, not a dead run
        score = 0.0
    correct = score >= 1.0
    feedback = "" if correct else f"answer {parsed.answer[:40]} is wrong"
    return Verdict(1.0 if correct else 0.0, correct, parsed.well_formed, parsed.answer, feedback)


def domain_table() -> list[dict[str, str]]:
    """One row per domain with a sample question and solution (for `cptlab domains`)."""
    rows = []
    for d in BUILTIN:
        ex = make_split(d.name, "eval", 1)[0]
        rows.append(dict(name=d.name, family=d.family, ood_of=d.ood_of or "", task=d.task,
                         description=d.description, example=ex.question, solution=ex.solution().strip()))
    return rows


__all__ = ["Domain", "Example", "Verdict", "all_domain_names", "check_domain", "get_domain", "make_split",
           "verify", "domain_table", "EVAL_POOL", "parse_answer", "format_answer"]
