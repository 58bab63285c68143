"""Verifiers: how a completion is checked, one registry, each returning a reward, whether the answer
was well formed, and the textual feedback that SDPO's self-teacher reads.

    verify(name, completion, item, *, answer_format=None, **options) -> Verdict
    verify_batch(name, completions, items, *, answer_format=None, **options) -> list[Verdict]

`item` is one data-set row under cptlab's field names (question, answer, choices, tools, test, tests,
entry_point, prefix, ... : tasks/datasets.py maps a file's columns to them). The completion is read in
an answer format (tasks/answer.py): `answer_format` where given (a domain's: set by the domain, else
fixed by its verifier, else the run's `prompt.answer_format`), else the verifier's own (`code`: a
fenced block; `tool_call`: <tool_call>{json}</tool_call>), else `boxed`. The reward reads only the strict answer (the
format's last wrapper); a lenient reading (the right value without the right wrapper) is reported
beside it, never rewarded.

Built in: exact, numeric, math (math-verify), choice, tool_call, regex (answers.py, tool_call.py) and
code (code.py: the program runs against the item's tests in the sandbox). `python:module:function`
names a user's own: `function(completion, item, **options)` returning a reward in [0, 1] (or a bool),
a (reward, feedback) pair, a dict with reward / well_formed / feedback, or a Verdict.

A verifier that raises on one item gives reward 0, a feedback line and `Verdict.error`, which the
evaluator and the trainer count; it never ends a run.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..tasks.answer import ParsedAnswer


def get_format(name: str):
    # imported here: cptlab.tasks builds on this package (a data-set domain's verdicts)
    from ..tasks.answer import get_format as lookup

    return lookup(name)

FEEDBACK_MAX_CHARS = 1000
"""Longest feedback a verifier returns (longer text keeps its head and tail around ' ... ')."""


@dataclass(frozen=True)
class Verdict:
    reward: float
    """In [0, 1]; what GRPO's advantages and SDPO's success test read."""
    correct: bool
    """The strict answer (the format's last wrapper) is right; accuracy counts this."""
    well_formed: bool
    """The answer format's wrapper rules hold (and, for code and tool calls, the content parses)."""
    answer: str | None
    """The strict answer as read, None if there is none."""
    feedback: str
    """What the self-teacher reads about this attempt ('' when correct)."""
    lenient_correct: bool = False
    """The right value is written, with or without the right wrapper (correct implies it)."""
    answer_format: str = "tags"
    """The format the completion was read in."""
    lenient_answer: str | None = None
    """The value the lenient reader took: the first candidate that is right, else the first one."""
    error: str | None = None
    """The verifier raised on this item: its one-line message (the reward is then 0)."""


@dataclass(frozen=True)
class Verifier:
    name: str
    compare: Callable[..., tuple[bool, str]] | None
    """(answer, item, **options) -> (right, feedback when wrong); None for a batch-only verifier."""
    answer_format: str | None
    """The format its answers come in; None: the run's (prompt.answer_format)."""
    needs: tuple[str, ...]
    """Item fields it reads (a data set's rows are checked for them when it is loaded)."""
    description: str
    prepare: Callable[[dict], dict] | None = None
    """Normalises one item when the data set is loaded (e.g. choices to a list, the answer to a
    letter); raises ValueError naming what is wrong with the row."""
    batch: Callable[..., list[tuple[bool, str]]] | None = None
    """(answers, items, **options) -> one (right, feedback) per answer, for verifiers that are
    cheaper run together (code: a pool of sandboxed programs)."""
    lenient: bool = True
    """Whether the lenient reading is scored too (code: no, it would run every program twice)."""
    reference: Callable[[dict], str] | None = None
    """The reference answer text of an item (what SFT and demonstrations write inside the wrapper);
    None: str(item['answer'])."""
    user_function: Callable | None = None
    """A `python:` verifier: called with the whole completion instead of `compare`."""

    def options(self) -> list[str]:
        """The option names it takes (keyword arguments of compare or batch after answer, item)."""
        fn = self.compare or self.batch or self.user_function
        params = list(inspect.signature(fn).parameters.values())[2:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return ["*"]
        return [p.name for p in params]

    def reference_text(self, item: dict) -> str:
        return self.reference(item) if self.reference else str(item.get("answer", ""))


REGISTRY: dict[str, Verifier] = {}


def register(name: str, *, answer_format: str | None = None, needs: Sequence[str] = ("answer",),
             description: str = "", prepare=None, batch=None, lenient: bool = True, reference=None):
    """Decorator registering `compare(answer, item, **options) -> (right, feedback)` under `name`."""

    def wrap(compare):
        REGISTRY[name] = Verifier(name, compare, answer_format, tuple(needs), description or (compare.__doc__ or "")
                                  .strip().split("\n")[0], prepare, batch, lenient, reference)
        return compare

    return wrap


def _load_user(name: str, field: str) -> Verifier:
    """`python:module:function`: imported now (the current directory on the path, like `python -m`)."""
    parts = name.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ConfigError(field, name, "python:MODULE:FUNCTION (e.g. python:my_checks:score)")
    _, module, function = parts
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise ConfigError(field, name, f"an importable module ({module} does not import: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise ConfigError(field, name, f"a function of module {module} (it has no callable '{function}')")
    return Verifier(name, None, None, ("question",), (fn.__doc__ or f"user verifier {name}").strip().split("\n")[0],
                    user_function=fn)


def get_verifier(name: str, field: str = "verifier") -> Verifier:
    """The registered verifier `name`, or a user's `python:module:function`; ConfigError naming `field`."""
    _load_builtin()
    if name.startswith("python:"):
        return _load_user(name, field)
    if name not in REGISTRY:
        raise ConfigError(field, name, "a verifier (one of " + ", ".join(REGISTRY) + ", or python:MODULE:FUNCTION)",
                          choices=REGISTRY)
    return REGISTRY[name]


def check_options(verifier: Verifier, options: dict, field: str) -> None:
    """Unknown option names are refused now, not at the first item."""
    known = verifier.options()
    if "*" in known:
        return
    for key in options:
        if key not in known:
            raise ConfigError(f"{field}.{key}", options[key], f"an option of verifier '{verifier.name}' "
                              f"(one of {', '.join(known) or 'none'})", choices=known)


def cap(text: str, limit: int = FEEDBACK_MAX_CHARS) -> str:
    """`text` at most `limit` characters: its head and tail around ' ... ' (a traceback's last line
    and a failing test's first line both survive)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head].rstrip() + " ... " + text[-(limit - head - 5):].lstrip()


def _missing(parsed: ParsedAnswer, describe: str) -> str:
    if parsed.placeholder:
        return f"{describe} holds a placeholder, not the answer"
    if parsed.empty:
        return f"{describe} is empty"
    return f"no answer inside {describe}"


def _error_line(e: BaseException) -> str:
    return cap(f"{type(e).__name__}: {' '.join(str(e).split())}", 200)


def _user_verdict(v: Verifier, completion: str, item: dict, fmt: str, options: dict) -> Verdict:
    parsed = get_format(fmt).parse(completion)
    out = v.user_function(completion, item, **options)
    if isinstance(out, Verdict):
        return out
    feedback, well_formed = "", parsed.well_formed
    if isinstance(out, tuple):
        out, feedback = out
    elif isinstance(out, dict):
        feedback, well_formed = str(out.get("feedback", "")), bool(out.get("well_formed", well_formed))
        out = out["reward"]
    reward = float(out)
    if not 0.0 <= reward <= 1.0:
        raise ValueError(f"reward {reward} outside [0, 1]")
    right = reward >= 1.0
    return Verdict(reward, right, well_formed, parsed.answer, "" if right else cap(feedback or "the answer is wrong"),
                   right, fmt, parsed.answer)


def _verdict(v: Verifier, parsed: ParsedAnswer, fmt: str, item: dict, result: tuple[bool, str] | None,
             options: dict) -> Verdict:
    """Verdict of a parsed completion given the strict answer's (right, feedback), or None if it has none."""
    right = bool(result and result[0])
    hits = []
    if v.lenient and v.compare is not None:
        for c in parsed.lenient:
            if (right and c == parsed.answer) or _safe_compare(v, c, item, options):
                hits.append(c)
                break
    lenient = hits[0] if hits else (parsed.lenient[0] if parsed.lenient else None)
    if result is None:
        feedback = _missing(parsed, get_format(fmt).describe)
    else:
        feedback = "" if right else cap(result[1])
    return Verdict(1.0 if right else 0.0, right, parsed.well_formed, parsed.answer, feedback, right or bool(hits),
                   fmt, lenient)


def _safe_compare(v: Verifier, answer: str, item: dict, options: dict) -> bool:
    try:
        return bool(v.compare(answer, item, **options)[0])
    except Exception:
        return False


def _error_verdict(e: BaseException, fmt: str, parsed: ParsedAnswer | None = None) -> Verdict:
    line = _error_line(e)
    return Verdict(0.0, False, bool(parsed and parsed.well_formed), parsed.answer if parsed else None,
                   f"verifier error: {line}", False, fmt, None, error=line)


def verify(name: str, completion: str, item: dict, *, answer_format: str | None = None, **options) -> Verdict:
    """Check one completion against one item with verifier `name` (see the module docstring)."""
    return verify_batch(name, [completion], [item], answer_format=answer_format, **options)[0]


def verify_batch(name: str | Verifier, completions: Sequence[str], items: Sequence[dict], *,
                 answer_format: str | None = None, **options) -> list[Verdict]:
    """One Verdict per (completion, item); a batch verifier (code) runs its answers together."""
    v = name if isinstance(name, Verifier) else get_verifier(name)
    fmt = answer_format or v.answer_format or "boxed"
    if v.user_function is not None:
        out = []
        for completion, item in zip(completions, items):
            try:
                out.append(_user_verdict(v, completion, item, fmt, options))
            except Exception as e:
                out.append(_error_verdict(e, fmt))
        return out
    parsed = [get_format(fmt).parse(c) for c in completions]
    results: list[tuple[bool, str] | None | BaseException] = [None] * len(parsed)
    todo = [i for i, p in enumerate(parsed) if p.answer is not None]
    if v.batch is not None and todo:
        try:
            for i, r in zip(todo, v.batch([parsed[i].answer for i in todo], [items[i] for i in todo], **options)):
                results[i] = r
        except Exception as e:
            for i in todo:
                results[i] = e
    else:
        for i in todo:
            try:
                results[i] = v.compare(parsed[i].answer, items[i], **options)
            except Exception as e:
                results[i] = e
    return [_error_verdict(r, fmt, p) if isinstance(r, BaseException) else _verdict(v, p, fmt, item, r, options)
            for p, item, r in zip(parsed, items, results)]


def prepare_item(v: Verifier, item: dict) -> dict:
    """The item normalised by the verifier (raises ValueError naming what is wrong)."""
    missing = [f for f in v.needs if item.get(f) in (None, "")]
    if missing:
        raise ValueError(f"no value for {', '.join(missing)} (verifier '{v.name}' reads it)")
    return v.prepare(dict(item)) if v.prepare else item


def table() -> list[dict[str, str]]:
    """One row per built-in verifier: name, answer format, fields it reads, options, what it checks."""
    _load_builtin()
    return [dict(name=v.name, answer_format=v.answer_format or "(the run's)", needs=", ".join(v.needs),
                 options=", ".join(v.options()), description=v.description) for v in REGISTRY.values()]


def _load_builtin() -> None:
    from . import answers, code, tool_call  # noqa: F401  (they register themselves on first import)


def replace(verdict: Verdict, **changes: Any) -> Verdict:
    return dataclasses.replace(verdict, **changes)


__all__ = ["Verdict", "Verifier", "verify", "verify_batch", "get_verifier", "check_options", "prepare_item",
           "register", "REGISTRY", "table", "cap", "FEEDBACK_MAX_CHARS"]
