"""Task domains: registry, disjoint train/eval splits, rendering and verification.

A domain is a reasoning-gym generator (domains.py) or a data set checked by a verifier (datasets.py,
verifiers/); everything downstream (stages, evaluation, warm-up, studies, report) treats both alike.
`make_split(name, "eval", n)` is a fixed held-out set; `make_split(name, "train", n, seed)` draws from
another seed (a generator) or samples the training rows (a data set), never from the eval pool.
The registry holds the built-in domains plus those of the run's `domains` config section: validation
checks a config against its own registry (`domain_registry`, nothing global changes); the entry points
that run work install it (`install_domains`, `domains_installed` for a block: the driver's run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import re
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, UserError
from .answer import FORMATS, format_answer, get_format, parse_answer
from .domains import BUILTIN, EVAL_POOL, Domain, _identity
from ..verifiers import Verdict, check_options, get_verifier, verify_batch as _verify_batch
from . import datasets as _datasets

_BUILTIN: dict[str, Domain] = {d.name: d for d in BUILTIN}
_REGISTRY: dict[str, Domain] = dict(_BUILTIN)
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def all_domain_names() -> list[str]:
    return list(_REGISTRY)


def builtin_domain_names() -> list[str]:
    return list(_BUILTIN)


def check_domain(name: str, field: str, registry: Mapping[str, Domain] | None = None) -> Domain:
    """The domain `name` of `registry` (default: the installed one); ConfigError naming `field` (with the
    closest name as a suggestion) if none."""
    registry = _REGISTRY if registry is None else registry
    if name not in registry:
        raise ConfigError(field, name, "a domain (one of " + ", ".join(registry) + ")", choices=registry)
    return registry[name]


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


_DATASET_KEYS = ("split", "eval_split", "fields", "verifier", "verifier_options", "answer_format", "bad_rows", "template",
                 "filter", "extract", "shuffle_choices")


def _dataset_domain(name: str, spec: Any, where: str) -> Domain:
    """A data-set domain: its rows read and split now, so a bad file fails at config load."""
    if name in _BUILTIN:
        raise ConfigError(where, name, "a new domain name for a data set (this is a built-in generator domain)")
    if spec.task or spec.config:
        raise ConfigError(f"{where}.task" if spec.task else f"{where}.config", spec.task or spec.config,
                          "empty for a data-set domain (source/eval_source and task are two kinds of domain)")
    if not spec.verifier:
        raise ConfigError(f"{where}.verifier", spec.verifier, "a verifier for a data set (exact, numeric, math, "
                          "choice, tool_call, code, regex or python:MODULE:FUNCTION)")
    verifier = get_verifier(spec.verifier, f"{where}.verifier")
    check_options(verifier, spec.verifier_options, f"{where}.verifier_options")
    if spec.answer_format is not None and spec.answer_format not in FORMATS:
        raise ConfigError(f"{where}.answer_format", spec.answer_format, "null or one of " + ", ".join(FORMATS))
    if spec.eval_pool is not None and spec.eval_pool < 1:
        raise ConfigError(f"{where}.eval_pool", spec.eval_pool, "an integer >= 1 or null")
    try:
        slots = _datasets.template_slots(spec.template)
        spec.template.format(**{s: "x" for s in slots})
    except (ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"{where}.template", spec.template, f"a format string with named slots ({e})") from None
    unknown = [s for s in slots if not s.isidentifier() and "." not in s]
    if unknown:
        raise ConfigError(f"{where}.template", spec.template, "named slots only, e.g. {question} or {problem}")
    data = _datasets.load_dataset(spec, where)
    source = spec.source or spec.eval_source
    return Domain(name, name, "dataset", {}, None, None, None, _identity, spec.ood_of,
                  spec.description or f"{Path(source).name} ({verifier.name})", eval_pool=len(data.eval),
                  dataset=data, verifier=spec.verifier, verifier_options=dict(spec.verifier_options),
                  answer_format=spec.answer_format or verifier.answer_format)


def _config_domain(name: str, spec: Any, where: str) -> Domain:
    """A built-in domain with the spec's changes, a new domain rendered in reasoning-gym's words, or a
    data-set domain."""
    if not _NAME_RE.fullmatch(name) or name == "all":
        raise ConfigError(where, name, "a domain name of letters, digits and '_' (not 'all')")
    if spec.source or spec.eval_source:
        return _dataset_domain(name, spec, where)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(spec)}
    for key in _DATASET_KEYS:
        default = defaults[key]
        if getattr(spec, key) != default:
            raise ConfigError(f"{where}.{key}", getattr(spec, key), f"{'{}' if default == {} else default!r} "
                              "unless the domain is a data set (set source or eval_source)")
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


def domain_registry(specs: Mapping[str, Any], field: str = "domains") -> dict[str, Domain]:
    """The built-in domains plus `specs` (name -> an object with task, config, ood_of, description,
    eval_pool, or a data set's fields: config.DomainSpec), as a new mapping; nothing global changes. A
    wrong task, generator setting, data file or ood_of raises ConfigError naming `field.NAME.key`."""
    registry = dict(_BUILTIN)
    for name, spec in specs.items():
        registry[name] = _config_domain(str(name), spec, f"{field}.{name}")
    for name, spec in specs.items():
        ood_of = registry[name].ood_of
        if ood_of is not None and ood_of not in registry:
            raise ConfigError(f"{field}.{name}.ood_of", ood_of, "a domain name (one of " + ", ".join(registry) + ")",
                              choices=registry)
        if ood_of is not None and name not in _BUILTIN:  # a related variant shares its domain's family
            registry[name] = dataclasses.replace(registry[name], family=registry[ood_of].family)
    return registry


def _use(registry: dict[str, Domain]) -> dict[str, Domain]:
    """Make `registry` the one names are looked up in; returns the one it replaces."""
    previous = dict(_REGISTRY)
    _REGISTRY.clear()
    _REGISTRY.update(registry)
    return previous


def install_domains(specs: Mapping[str, Any], field: str = "domains") -> dict[str, Domain]:
    """Make the domains this process looks names up in (make_split, verify, ...) the built-in ones plus
    `specs` (domain_registry); returns the previous registry. Called by the entry points that run work
    on a config (the driver, `cptlab eval`, `cptlab domains`, a study's shared warm-up, the analyses that
    re-read a run), never by loading or validating a config."""
    return _use(domain_registry(specs, field))


@contextlib.contextmanager
def domains_installed(specs: Mapping[str, Any], field: str = "domains"):
    """install_domains for the duration of a `with` block; the previous registry is back afterwards."""
    previous = install_domains(specs, field)
    try:
        yield
    finally:
        _use(previous)


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
        """Reference completion: ' <reasoning> <wrapped answer>' (answer_only drops the reasoning); a
        worked solution that already ends in its wrapped answer (a data set's reasoning) is kept as it is."""
        wrapped = format_answer(self.answer, self.answer_format)
        if content == "answer_only" or not self.reasoning:
            return " " + wrapped
        if get_format(self.answer_format).parse(self.reasoning).answer is not None:
            return " " + self.reasoning.strip()
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
    if domain.dataset is not None:
        return _dataset_split(domain, split, n, seed, answer_format)
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


def domain_format(domain: Domain, answer_format: str) -> str:
    """The answer format a domain's prompts ask for: a data-set domain's own (set by the domain or fixed
    by its verifier), else the run's `prompt.answer_format`."""
    return domain.answer_format or answer_format


def _render_item(domain: Domain, item: dict, answer_format: str) -> Example:
    fmt = domain_format(domain, answer_format)
    question = item["question_text"] + "\n" + get_format(fmt).instruction
    answer = get_verifier(domain.verifier).reference_text(item)
    return Example(domain.name, question, str(item.get("reasoning") or ""), answer, item, fmt)


def _dataset_split(domain: Domain, split: str, n: int, seed: int, answer_format: str) -> list[Example]:
    """Eval: the first n held-out rows (hash order). Train: n rows drawn with `seed` (all of them,
    shuffled, when there are at most n)."""
    data = domain.dataset
    if split == "eval":
        return [_render_item(domain, item, answer_format) for item in data.eval[:n]]
    if not data.train:
        raise UserError(f"domain {domain.name} has no training rows (it has only an eval_source): train a stage "
                        "on a domain with a source")
    rng = random.Random(_seed(domain.name, "train", seed))
    rows = rng.sample(data.train, min(n, len(data.train)))
    return [_render_item(domain, item, answer_format) for item in rows]


def train_pool_size(name: str, default: int, registry: Mapping[str, Domain] | None = None) -> int:
    """How many training examples a stage samples its prompts from: all rows of a data set (at least
    one), `default` generated questions for a generator."""
    domain = check_domain(name, "domain", registry)
    return len(domain.dataset.train) if domain.dataset is not None else default


def eval_set_identity(name: str, n: int, style: str = "compact", answer_format: str = "tags") -> dict[str, Any]:
    """What makes two evaluations of `name` comparable prompt by prompt: the prompt count, a sha256 of the
    generator config (reasoning-gym task, its config, the held-out pool's seed and size, the prompt
    style and answer format) and a sha256 of the prompts and reference answers themselves."""
    domain = get_domain(name)
    config = dict(task=domain.task, task_config=domain.task_config, pool_seed=_seed(name, "eval"),
                  pool_size=domain.eval_pool, style=style, answer_format=answer_format)
    if domain.dataset is not None:  # the rows themselves are in prompts_sha256; the verifier is not
        config.update(verifier=domain.verifier, verifier_options=domain.verifier_options,
                      answer_format=domain_format(domain, answer_format))
    examples = make_split(name, "eval", n, style=style, answer_format=answer_format)
    content = json.dumps([[ex.question, ex.answer] for ex in examples], separators=(",", ":"))
    return {"prompts": n,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "prompts_sha256": hashlib.sha256(content.encode()).hexdigest()}


# --- verification --------------------------------------------------------------------------------


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


def _verify_generated(domain: Domain, example: Example, completion: str, style: str) -> Verdict:
    """reasoning-gym's verifier in the example's answer format; reward 1/0 from the strict answer. The
    lenient reading is reported beside it and never rewarded."""
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


def verify_batch(examples: list[Example], completions: list[str], style: str = "compact") -> list[Verdict]:
    """One Verdict per (example, completion): a generator domain's by reasoning-gym, a data set's by its
    verifier, each data-set domain's completions in one call (a code verifier runs them in one pool)."""
    out: list[Verdict | None] = [None] * len(examples)
    by_domain: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_domain.setdefault(ex.domain, []).append(i)
    for name, rows in by_domain.items():
        domain = get_domain(name)
        if domain.dataset is None:
            for i in rows:
                out[i] = _verify_generated(domain, examples[i], completions[i], style)
            continue
        verdicts = _verify_batch(get_verifier(domain.verifier), [completions[i] for i in rows],
                                 [examples[i].entry for i in rows], answer_format=examples[rows[0]].answer_format,
                                 **domain.verifier_options)
        for i, v in zip(rows, verdicts):
            out[i] = v
    return out  # type: ignore[return-value]


def verify(example: Example, completion: str, style: str = "compact") -> Verdict:
    """Score one completion (see verify_batch)."""
    return verify_batch([example], [completion], style)[0]


def domain_info(name: str) -> dict[str, Any]:
    """What a run records about a domain: its kind, and for a data set its verifier, answer format and
    the sizes of its splits (rows read, duplicates dropped, eval questions removed from training)."""
    d = get_domain(name)
    if d.dataset is None:
        return {"kind": "generator", "task": d.task, "eval_pool": d.eval_pool}
    return {"kind": "dataset", "verifier": d.verifier, "answer_format": d.answer_format, **d.dataset.info}


def domain_table(style: str = "compact", answer_format: str = "tags") -> list[dict[str, str]]:
    """One row per domain with a sample question and solution (for `cptlab domains`)."""
    rows = []
    for d in _REGISTRY.values():
        ex = make_split(d.name, "eval", 1, style=style, answer_format=answer_format)[0]
        if d.dataset is None:
            source = f"reasoning-gym {d.task}"
        else:
            i = d.dataset.info
            source = (f"{d.description}; verifier {d.verifier}; {i['train']} train / {i['eval']} eval"
                      + (f"; {i['duplicates']} duplicates dropped" if i["duplicates"] else "")
                      + (f"; {i['overlap']} eval questions removed from train" if i["overlap"] else "")
                      + (f"; {i['skipped']} bad rows skipped" if i["skipped"] else ""))
        rows.append(dict(name=d.name, family=d.family, ood_of=d.ood_of or "", task=d.task, source=source,
                         description=d.description, example=ex.question, solution=ex.solution().strip()))
    return rows


__all__ = ["Domain", "Example", "Verdict", "all_domain_names", "builtin_domain_names", "check_domain", "get_domain",
           "install_domains", "domain_registry", "domains_installed", "make_split", "verify", "verify_batch", "domain_table", "domain_info", "domain_format",
           "train_pool_size", "EVAL_POOL", "FORMATS", "parse_answer",
           "format_answer"]
