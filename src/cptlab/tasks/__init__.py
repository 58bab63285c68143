"""Task domains: registry, disjoint train/eval splits, rendering and verification.

`make_split(name, "eval", n)` is a fixed held-out set; `make_split(name, "train", n, seed)` draws from
another seed and drops any question that is in the domain's eval pool, so the two never overlap.
The registry holds the built-in domains plus those of the run's `domains` config section
(`install_domains`, called when a config is validated, so every process that loads it sees them).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError, UserError
from .answer import FORMATS, format_answer, get_format, parse_answer
from .domains import BUILTIN, EVAL_POOL, Domain, _identity

_BUILTIN: dict[str, Domain] = {d.name: d for d in BUILTIN}
_REGISTRY: dict[str, Domain] = dict(_BUILTIN)
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def all_domain_names() -> list[str]:
    return list(_REGISTRY)


def builtin_domain_names() -> list[str]:
    return list(_BUILTIN)


def check_domain(name: str, field: str) -> Domain:
    if name not in _REGISTRY:
        raise ConfigError(field, name, "a domain (one of " + ", ".join(_REGISTRY) + ")")
    return _REGISTRY[name]


def get_domain(name: str) -> Domain:
    return check_domain(name, "domain")


# --- domains from a config's `domains` section -----------------------------------------------------


def _reasoning_gym_tasks() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_generator(task: str, config: dict, where: str) -> None:
    """Build one item with these settings, so a wrong setting fails now with reasoning-gym's words."""
    import reasoning_gym

    taken = sorted({"size", "seed"} & set(config))
    if taken:
        raise ConfigError(f"{where}.config", config, f"generator settings without {', '.join(taken)} (cptlab sets those)")
    try:
        reasoning_gym.create_dataset(task, size=1, seed=0, **config)[0]
    except Exception as e:  # reasoning-gym raises TypeError, AssertionError, ValueError ... for bad settings
        message = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}.config", config,
                          f"settings reasoning-gym's '{task}' accepts ({type(e).__name__}: {message[:200]})") from None


def _config_domain(name: str, spec: Any, where: str) -> Domain:
    """A built-in domain with the spec's changes, or a new domain rendered in reasoning-gym's words."""
    if not _NAME_RE.fullmatch(name) or name == "all":
        raise ConfigError(where, name, "a domain name of letters, digits and '_' (not 'all')")
    config = dict(spec.config or {})
    if spec.eval_pool is not None and not 1 <= spec.eval_pool <= EVAL_POOL:
        raise ConfigError(f"{where}.eval_pool", spec.eval_pool, f"an integer in [1, {EVAL_POOL}] or null")
    base = _BUILTIN.get(name)
    if base is not None:
        if spec.task and spec.task != base.task:
            raise ConfigError(f"{where}.task", spec.task, f"'{base.task}' or empty (built-in domain {name} "
                              "keeps its task; define a new domain name for another task)")
        task, config = base.task, {**base.task_config, **config}
    else:
        tasks = _reasoning_gym_tasks()
        if spec.task not in tasks:
            close = difflib.get_close_matches(str(spec.task), tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see reasoning_gym.factory.DATASETS)"
            raise ConfigError(f"{where}.task", spec.task, "a reasoning-gym task name" + hint)
        task = spec.task
    _check_generator(task, config, where)
    if base is not None:
        return dataclasses.replace(base, task_config=config, ood_of=spec.ood_of or base.ood_of,
                                   description=spec.description or base.description,
                                   eval_pool=spec.eval_pool or base.eval_pool)
    return Domain(name, task, task, config, None, None, None, _identity, spec.ood_of,
                  spec.description or f"reasoning-gym {task}", eval_pool=spec.eval_pool or EVAL_POOL)


def install_domains(specs: Mapping[str, Any], field: str = "domains") -> None:
    """Make the registry the built-in domains plus `specs` (name -> an object with task, config,
    ood_of, description, eval_pool: config.DomainSpec), replacing what an earlier config installed.
    A wrong task, generator setting or ood_of raises ConfigError naming `field.NAME.key`."""
    registry = dict(_BUILTIN)
    for name, spec in specs.items():
        registry[name] = _config_domain(str(name), spec, f"{field}.{name}")
    for name, spec in specs.items():
        ood_of = registry[name].ood_of
        if ood_of is not None and ood_of not in registry:
            raise ConfigError(f"{field}.{name}.ood_of", ood_of, "a domain name (one of " + ", ".join(registry) + ")")
        if ood_of is not None and name not in _BUILTIN:  # a related variant shares its domain's family
            registry[name] = dataclasses.replace(registry[name], family=registry[ood_of].family)
    _REGISTRY.clear()
    _REGISTRY.update(registry)


# --- examples ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    domain: str
    question: str
    reasoning: str
    answer: str
    entry: dict[str, Any]
    answer_format: str = "tags"
    """The answer format its prompt asks for and its solution uses (tasks.answer.FORMATS)."""

    def solution(self, content: str = "full") -> str:
        """Reference completion: ' <reasoning> <wrapped answer>' (answer_only drops the reasoning)."""
        wrapped = format_answer(self.answer, self.answer_format)
        if content == "answer_only" or not self.reasoning:
            return " " + wrapped
        return f" {self.reasoning} {wrapped}"


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _render(domain: Domain, entry: dict, style: str, answer_format: str = "tags") -> Example:
    if style == "full" or not domain.has_compact:
        question = entry["question"] + "\n" + get_format(answer_format).instruction
        return Example(domain.name, question, "", str(entry["answer"]), entry, answer_format)
    return Example(domain.name, domain.compact_question(entry), domain.compact_reasoning(entry),
                   domain.compact_answer(entry), entry, answer_format)


def _question_key(domain: Domain, entry: dict) -> str:
    """What must differ between train and eval questions, whatever the format asked for."""
    return domain.compact_question(entry) if domain.has_compact else entry["question"]


def _generate(domain: Domain, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(domain.task, size=size, seed=seed, **domain.task_config)
    return [dataset[i] for i in range(size)]


@functools.lru_cache(maxsize=64)
def _pool(name: str, definition: str) -> tuple[dict, ...]:
    # `definition` is only part of the cache key: a domain redefined by another config regenerates
    domain = get_domain(name)
    return tuple(_generate(domain, domain.eval_pool, _seed(name, "eval")))


def _eval_pool(name: str) -> tuple[dict, ...]:
    d = get_domain(name)
    return _pool(name, repr((d.task, sorted(d.task_config.items()), d.eval_pool)))


def make_split(name: str, split: str, n: int, seed: int = 0, style: str = "compact",
               answer_format: str = "tags") -> list[Example]:
    """n examples of domain `name`; split 'eval' is fixed, 'train' depends on `seed`.

    style and answer_format are the prompt section's: how the question is shown (domains without a
    compact rendering are always shown in full, with the format's instruction) and which format it asks for.
    An eval split is at most the domain's held-out pool (EVAL_POOL, or the smaller eval_pool it sets)."""
    domain = get_domain(name)
    render = functools.partial(_render, domain, style=style, answer_format=answer_format)
    if split == "eval":
        if n > EVAL_POOL:
            raise ConfigError("eval.num_prompts", n, f"at most {EVAL_POOL}")
        return [render(e) for e in _eval_pool(name)[:n]]
    held_out = {_question_key(domain, e) for e in _eval_pool(name)}
    out: list[Example] = []
    chunk = 0
    while len(out) < n:
        for entry in _generate(domain, max(256, n), _seed(name, "train", seed, chunk)):
            if _question_key(domain, entry) not in held_out:
                out.append(render(entry))
        chunk += 1
        if chunk > 50 and not out:
            raise UserError(f"domain {name}: every generated training question is in its held-out pool of "
                            f"{domain.eval_pool} (too few distinct questions; make the domain larger or set "
                            f"domains.{name}.eval_pool lower)")
    return out[:n]


def eval_set_identity(name: str, n: int, style: str = "compact", answer_format: str = "tags") -> dict[str, Any]:
    """What makes two evaluations of `name` comparable prompt by prompt: the prompt count, a sha256 of the
    generator config (reasoning-gym task, its config, the held-out pool's seed and size, the prompt
    style and answer format) and a sha256 of the prompts and reference answers themselves."""
    domain = get_domain(name)
    config = dict(task=domain.task, task_config=domain.task_config, pool_seed=_seed(name, "eval"),
                  pool_size=domain.eval_pool, style=style, answer_format=answer_format)
    examples = make_split(name, "eval", n, style=style, answer_format=answer_format)
    content = json.dumps([[ex.question, ex.answer] for ex in examples], separators=(",", ":"))
    return {"prompts": n,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "prompts_sha256": hashlib.sha256(content.encode()).hexdigest()}


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    reward: float
    correct: bool
    """The strict answer (the last wrapper's content) is right; the reward reads only this."""
    well_formed: bool
    answer: str | None
    feedback: str
    """Short textual feedback for the self-teacher ('' when correct)."""
    lenient_correct: bool = False
    """The right value is written, with or without the right wrapper (correct implies it); lenient
    minus strict accuracy is the share of answers lost to the format alone."""
    answer_format: str = "tags"
    lenient_answer: str | None = None
    """The value the lenient reader took: the first candidate that is right, else the first one."""


@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
    """reasoning-gym's scorer for a task, built once: building it instantiates the task's dataset
    (25 ms for spell_backward, which loads a word list), far more than scoring one answer (0.3 us)."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _is_right(domain: Domain, example: Example, text: str, style: str) -> bool:
    if style != "full" and domain.has_compact:
        text = domain.to_verifier(text)
    try:
        return float(_score_fn(domain.task)(text, example.entry)) >= 1.0
    except Exception:  # a verifier crash on odd text is a wrong answer, not a dead run
        return False


def _missing_feedback(parsed, fmt) -> str:
    if parsed.placeholder:
        return f"{fmt.describe} holds a placeholder, not the answer"
    if parsed.empty:
        return f"{fmt.describe} is empty"
    return f"no answer inside {fmt.describe}"


def verify(example: Example, completion: str, style: str = "compact") -> Verdict:
    """Score a completion with reasoning-gym's verifier in the example's answer format; reward 1/0
    from the strict answer. The lenient reading is reported beside it and never rewarded."""
    domain = get_domain(example.domain)
    fmt = get_format(example.answer_format)
    parsed = fmt.parse(completion)
    correct = parsed.answer is not None and _is_right(domain, example, parsed.answer, style)
    hits = [c for c in parsed.lenient if (correct and c == parsed.answer) or _is_right(domain, example, c, style)]
    lenient = hits[0] if hits else (parsed.lenient[0] if parsed.lenient else None)
    reward = 1.0 if correct else 0.0
    if parsed.answer is None:
        feedback = _missing_feedback(parsed, fmt)
    else:
        feedback = "" if correct else f"answer {parsed.answer[:40]} is wrong"
    return Verdict(reward, correct, parsed.well_formed, parsed.answer, feedback, correct or bool(hits),
                   fmt.name, lenient)


def domain_table() -> list[dict[str, str]]:
    """One row per domain with a sample question and solution (for `cptlab domains`)."""
    rows = []
    for d in _REGISTRY.values():
        ex = make_split(d.name, "eval", 1)[0]
        rows.append(dict(name=d.name, family=d.family, ood_of=d.ood_of or "", task=d.task,
                         description=d.description, example=ex.question, solution=ex.solution().strip()))
    return rows


__all__ = ["Domain", "Example", "Verdict", "all_domain_names", "builtin_domain_names", "check_domain", "get_domain",
           "install_domains", "make_split", "verify", "domain_table", "EVAL_POOL", "FORMATS", "parse_answer",
           "format_answer"]
