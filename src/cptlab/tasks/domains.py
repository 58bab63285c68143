"""Built-in domains: reasoning-gym generators and verifiers, plus our prompt and answer formats.

A domain is a reasoning-gym task with a fixed generator config, a *compact* rendering (short prompt,
short reasoning, answer) that a tiny character-level model can learn, and the verifier's
`score_answer`. Each in-distribution domain has a partially related `<name>_ood` variant: the same
skill on another size, which the study uses to measure transfer and harm to related domains.
A run's config can add domains (any reasoning-gym task, without a compact rendering, or a data set
checked by a verifier: tasks/datasets.py) or change a built-in's generator settings: its `domains`
section, installed by `cptlab.tasks.install_domains`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Entry = dict[str, Any]

EVAL_POOL = 512
"""Default size of a domain's held-out pool; eval sets are its prefixes, train never draws from it."""


@dataclass(frozen=True)
class Domain:
    name: str
    family: str
    task: str
    """reasoning-gym dataset name."""
    task_config: dict[str, Any]
    compact_question: Callable[[Entry], str] | None
    """None: no compact rendering; the domain is always shown in reasoning-gym's own words (full)."""
    compact_answer: Callable[[Entry], str] | None
    compact_reasoning: Callable[[Entry], str] | None
    to_verifier: Callable[[str], str]
    """Compact answer text -> the string reasoning-gym's score_answer expects."""
    ood_of: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    eval_pool: int = EVAL_POOL
    """Size of the held-out pool (smaller for domains with few distinct questions, so some are left
    to train on)."""
    dataset: Any = None
    """A data-set domain's rows (tasks.datasets.LoadedDataset); None for a generator domain."""
    verifier: str = ""
    """A data-set domain's verifier (verifiers.REGISTRY name or python:module:function)."""
    verifier_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the verifier (e.g. {rel_tol: 1e-4}, {timeout: 5})."""
    answer_format: str | None = None
    """A data-set domain's answer format, where it is fixed (by the domain or its verifier)."""

    @property
    def has_compact(self) -> bool:
        return self.compact_question is not None


# --- arithmetic: chain sums --------------------------------------------------------------------


def _arith_question(e: Entry) -> str:
    return e["metadata"]["expression"].replace(" ", "")


def _arith_reasoning(e: Entry) -> str:
    toks = e["metadata"]["expression"].split()
    acc, steps = int(toks[0]), []
    for op, num in zip(toks[1::2], toks[2::2]):
        new = acc + int(num) if op == "+" else acc - int(num)
        steps.append(f"{acc}{op}{num}={new}")
        acc = new
    return " ".join(steps)


# --- counting: letters in words -----------------------------------------------------------------


def _count_question(e: Entry) -> str:
    m = e["metadata"]
    return f"count {m['target_letter']}: {' '.join(m['span'])}"


def _count_reasoning(e: Entry) -> str:
    m = e["metadata"]
    letter = m["target_letter"]
    # one mark per occurrence, word by word: the model counts marks instead of scanning silently
    return " ".join(f"{w}:{letter * w.lower().count(letter)}" for w in m["span"] if letter in w.lower()) or "none"


# --- sorting: integers ascending / descending ---------------------------------------------------


def _int_str(x: str) -> str:
    return str(int(float(x)))


def _sort_question(e: Entry) -> str:
    m = e["metadata"]
    d = "asc" if m["direction"] == "ascending" else "desc"
    return f"sort {d}: " + " ".join(_int_str(x) for x in m["original_numbers"])


def _sort_answer(e: Entry) -> str:
    return " ".join(_int_str(x) for x in e["metadata"]["sorted_numbers"])


def _list_to_verifier(answer: str) -> str:
    return str([t for t in answer.replace(",", " ").split()])


# --- reversal: spell a word backward ------------------------------------------------------------


def _rev_question(e: Entry) -> str:
    return f"reverse: {e['metadata']['word']}"


# --- filtering: keep numbers by a comparison -----------------------------------------------------

_FILTER_OPS = {"keep_smaller": "keep <", "keep_larger": "keep >", "remove_smaller": "drop <",
               "remove_larger": "drop >"}


def _filter_question(e: Entry) -> str:
    m = e["metadata"]
    return f"{_FILTER_OPS[m['operation']]}{_int_str(m['filter_value'])}: " + " ".join(
        _int_str(x) for x in m["original_numbers"])


def _filter_answer(e: Entry) -> str:
    return " ".join(_int_str(x) for x in e["metadata"]["result"]) or "none"


def _filter_to_verifier(answer: str) -> str:
    return "[]" if answer.strip() == "none" else _list_to_verifier(answer)


# --- gcd: Euclid's remainder sequence -----------------------------------------------------------


def _gcd_question(e: Entry) -> str:
    return "gcd " + " ".join(str(n) for n in e["metadata"]["numbers"])


def _gcd_reasoning(e: Entry) -> str:
    a, b = sorted(e["metadata"]["numbers"], reverse=True)
    seq = [a, b]
    while b:
        a, b = b, a % b
        seq.append(b)
    return " ".join(str(n) for n in seq)


def _none(e: Entry) -> str:
    return ""


def _answer_field(e: Entry) -> str:
    return str(e["answer"])


def _identity(answer: str) -> str:
    return answer


def _family(name: str, family: str, task: str, cfg: dict, ood_cfg: dict, q, a, r, v, desc: str) -> list[Domain]:
    base = Domain(name, family, task, dict(cfg), q, a, r, v, None, desc)
    ood = Domain(f"{name}_ood", family, task, {**cfg, **ood_cfg}, q, a, r, v, name, desc + " (OOD size)")
    return [base, ood]


# sorting and filtering read the same lists: three integers 0-50 in-domain, four or five up to 99 OOD
_THREE_NUMBERS = dict(min_numbers=3, max_numbers=3, min_decimals=0, max_decimals=0, min_value=0, max_value=50)
_MORE_NUMBERS = dict(min_numbers=4, max_numbers=5, max_value=99)

BUILTIN: list[Domain] = [
    *_family("arithmetic", "arithmetic", "chain_sum",
             dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1),
             dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2),
             _arith_question, _answer_field, _arith_reasoning, _identity,
             "add and subtract small integers"),
    *_family("counting", "counting", "letter_counting",
             dict(min_words=1, max_words=2), dict(min_words=3, max_words=4),
             _count_question, _answer_field, _count_reasoning, _identity,
             "count a letter in a few words"),
    *_family("sorting", "sorting", "number_sorting", _THREE_NUMBERS, _MORE_NUMBERS,
             _sort_question, _sort_answer, _none, _list_to_verifier,
             "sort integers ascending or descending"),
    *_family("reversal", "string", "spell_backward",
             dict(min_word_len=3, max_word_len=4), dict(min_word_len=5, max_word_len=6),
             _rev_question, _answer_field, _none, _identity,
             "spell a word backward"),
    *_family("filtering", "logic", "number_filtering", _THREE_NUMBERS, _MORE_NUMBERS,
             _filter_question, _filter_answer, _none, _filter_to_verifier,
             "keep or drop integers by a comparison"),
    *_family("gcd", "number theory", "gcd",
             dict(min_value=1, max_value=40), dict(min_value=41, max_value=150),
             _gcd_question, _answer_field, _gcd_reasoning, _identity,
             "greatest common divisor of two integers"),
]
