"""Answer formats: how the final answer is wrapped, read back, asked for, and what counts as a slip.

A format is one registry entry (`FORMATS`, chosen by `prompt.answer_format`):
  tags   `<answer>X</answer>`, the tiny model's format (its tokenizer has the tags as tokens)
  boxed  `\\boxed{X}`, the format of the study and of most math-tuned instruct models
Each entry owns its parser, its renderer (reference solutions), its instruction (`prompt.style=full`)
and a worked example, a neutral question and its answer in the format (`prompt.format_example`).

Reading a completion gives three things (see `ParsedAnswer`): the strict answer (the content of the
last complete wrapper; the reward reads only this), whether the wrapper rules hold (`well_formed`),
and lenient candidates (the right value written without the right wrapper) so that a format slip can
be told apart from a wrong answer. Parsing never raises, whatever the text: it runs on every sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

OPEN, CLOSE = "<answer>", "</answer>"
BOX = "\\boxed"

_TAG_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_BOX_OPEN_RE = re.compile(re.escape(BOX) + r"\s*\{")
# A number as written: '-3', '1,000', '2.5'; not the '3' of 'x3' or the '-3' of '5-3'.
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# Words a model copies from an instruction instead of answering: '\boxed{ANSWER}', '<answer>...</answer>'.
_PLACEHOLDERS = {"answer", "youranswer", "finalanswer", "theanswer", "...", "…"}
# Allowed after a box: closing math delimiters and end punctuation ("$\boxed{5}$.", "\[\boxed{5}\]").
_BOX_TAIL_RE = re.compile(r"(\s|\$|\\\]|\\\)|[.!*])*")


@dataclass(frozen=True)
class ParsedAnswer:
    answer: str | None
    """Content of the last complete wrapper, stripped; None if there is none, or if it is empty or a
    placeholder. The only thing the reward reads."""
    well_formed: bool
    """The wrapper rules hold: exactly one wrapper, closed, with a real answer, and nothing after it
    (tags: whitespace only; boxed: whitespace, `$`, `\\]`, `\\)` or end punctuation)."""
    wrappers: int = 0
    """Wrappers in the text (tags: the most of complete pairs, opening and closing tags)."""
    unclosed: bool = False
    """An opened wrapper is never closed."""
    empty: bool = False
    """The last wrapper is empty."""
    placeholder: bool = False
    """The last wrapper holds a placeholder copied from an instruction ('ANSWER', '...')."""
    trailing_text: bool = False
    """Text other than whitespace/closing punctuation follows the last wrapper."""
    lenient: tuple[str, ...] = ()
    """Values a lenient reader tries, in order (see `lenient_candidates`)."""


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def _last_line(text: str) -> str | None:
    lines = [" ".join(line.split()).rstrip(".").strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def is_placeholder(content: str) -> bool:
    return re.sub(r"[\s_<>\[\]]", "", content.lower()) in _PLACEHOLDERS


def lenient_candidates(text: str, content: str | None, markup: Callable[[str], str]) -> tuple[str, ...]:
    """What a reader who ignores the wrapper rules takes as the answer: the last wrapper's content and
    the last number in it when there is a real one; otherwise the last number of the text and its last
    non-empty line, with the format's markup removed. At most two values, so leniency stays bounded."""
    if content is not None and content.strip() and not is_placeholder(content):
        values = [content.strip(), _last_number(content)]
    else:
        body = markup(text)
        values = [_last_number(body), _last_line(body)]
    return tuple(dict.fromkeys(v for v in values if v))


def _parsed(text: str, contents: list[str], wrappers: int, unclosed: bool, ends_clean: bool,
            markup: Callable[[str], str]) -> ParsedAnswer:
    last = contents[-1].strip() if contents else None
    empty = last == ""
    placeholder = last is not None and not empty and is_placeholder(last)
    answer = None if last is None or empty or placeholder else last
    trailing = bool(contents) and not ends_clean
    well_formed = wrappers == 1 and not unclosed and answer is not None and not trailing
    return ParsedAnswer(answer, well_formed, wrappers, unclosed, empty, placeholder, trailing,
                        lenient_candidates(text, last, markup))


# --- tags: <answer>X</answer> ---------------------------------------------------------------------


def _strip_tags(text: str) -> str:
    return text.replace(OPEN, " ").replace(CLOSE, " ")


def parse_tags(text: str) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    contents = _TAG_RE.findall(text)
    unclosed = text.count(OPEN) != text.count(CLOSE) or (not contents and OPEN in text)
    ends_clean = text.rstrip().endswith(CLOSE)
    wrappers = max(len(contents), text.count(OPEN), text.count(CLOSE))  # nested tags are two
    return _parsed(text, contents, wrappers, unclosed, ends_clean, _strip_tags)


# --- boxed: \boxed{X} -----------------------------------------------------------------------------


def _boxes(text: str) -> tuple[list[tuple[str, int, int]], bool]:
    """(content, start, end) of each complete box, braces matched (`\\boxed{\\frac{1}{2}}` holds
    `\\frac{1}{2}`), and whether some box is never closed. A box inside a box counts once (the outer)."""
    boxes, pos = [], 0
    while True:
        m = _BOX_OPEN_RE.search(text, pos)
        if m is None:
            return boxes, False
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return boxes, True
        boxes.append((text[m.end(): i - 1], m.start(), i))
        pos = i


def _strip_boxes(text: str) -> str:
    """The text with each box replaced by its content (and an unclosed box opener dropped)."""
    boxes, _ = _boxes(text)
    out, pos = [], 0
    for content, start, end in boxes:
        out += [text[pos:start], " ", content, " "]
        pos = end
    return _BOX_OPEN_RE.sub(" ", "".join(out) + text[pos:])


def parse_boxed(text: str) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    boxes, unclosed = _boxes(text)
    ends_clean = bool(boxes) and _BOX_TAIL_RE.fullmatch(text[boxes[-1][2]:]) is not None
    return _parsed(text, [c for c, _, _ in boxes], len(boxes), unclosed, ends_clean, _strip_boxes)


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerFormat:
    name: str
    parse: Callable[[str], ParsedAnswer]
    render: Callable[[str], str]
    """answer -> the answer in its wrapper (reference solutions, answer-only demonstrations)."""
    instruction: str
    """Asks for the format; appended to reasoning-gym's question when prompt.style = full."""
    example_question: str
    """A neutral question that no domain asks, and its answer in the format: the worked example that
    prompt.format_example shows as an exchange before the real question (prompts.py)."""
    example_answer: str
    markers: tuple[str, ...]
    """Wrapper pieces that count as one token in character-level artifact statistics."""
    describe: str
    """How the feedback names the wrapper."""


_EXAMPLE_QUESTION = "How many days are in a week?"
FORMATS: dict[str, AnswerFormat] = {f.name: f for f in (
    AnswerFormat("tags", parse_tags, lambda a: f"{OPEN}{a}{CLOSE}",
                 "Give your final answer inside <answer></answer>.",
                 _EXAMPLE_QUESTION, "A week has 7 days. <answer>7</answer>",
                 (CLOSE, OPEN), "<answer></answer>"),
    AnswerFormat("boxed", parse_boxed, lambda a: f"{BOX}{{{a}}}",
                 "Put your final answer within \\boxed{}.",
                 _EXAMPLE_QUESTION, "A week has 7 days, so the answer is \\boxed{7}.",
                 (BOX + "{", "}"), "\\boxed{}"),
)}


def get_format(name: str) -> AnswerFormat:
    """The registered format `name`; KeyError naming the known ones (config validation checks first)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"answer format {name!r}: expected one of {', '.join(FORMATS)}") from None


def parse_answer(text: str, fmt: str = "tags") -> ParsedAnswer:
    return get_format(fmt).parse(text)


def format_answer(answer: str, fmt: str = "tags") -> str:
    return get_format(fmt).render(answer)
