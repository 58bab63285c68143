"""Answer formats: how the final answer is wrapped, read back, asked for, and what counts as a slip.

A format is one registry entry (`FORMATS`, chosen by `prompt.answer_format`, or by a data-set
domain's verifier where the answer has a shape of its own):
  tags       `<answer>X</answer>`, the tiny model's format (its tokenizer has the tags as tokens)
  boxed      `\\boxed{X}`, the format of the study and of most math-tuned instruct models
  code       a fenced ```python block: the program the `code` verifier runs
  tool_call  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the Hermes/Qwen tool-call layout
  react      `Action: NAME` / `Action Input: {json}` lines (ToolAlpaca's and the study's ToolUse layout)
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
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
BOX = "\\boxed"
FENCE = "```"

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
    """Content of the last complete wrapper, stripped (a wrapper nested in it unwrapped: `\\boxed{\\boxed{4}}`
    reads 4); None if there is none, or if it is empty or a placeholder. The only thing the reward reads."""
    well_formed: bool
    """The wrapper rules hold: exactly one wrapper, closed, with a real answer, and nothing after it
    (tags: whitespace only; boxed: whitespace, `$`, `\\]`, `\\)` or end punctuation)."""
    wrappers: int = 0
    """Wrappers in the text, nested ones included (tags: the most of complete pairs, opening and closing
    tags)."""
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


# --- tags: <answer>X</answer> (and <tool_call>X</tool_call>) -------------------------------------


def _parse_pair(text: str, open_: str, close: str) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    contents = re.findall(re.escape(open_) + r"(.*?)" + re.escape(close), text, re.DOTALL)
    contents = [c.rsplit(open_, 1)[-1] for c in contents]  # nested tags: the innermost content is the answer
    unclosed = text.count(open_) != text.count(close) or (not contents and open_ in text)
    ends_clean = text.rstrip().endswith(close)
    wrappers = max(len(contents), text.count(open_), text.count(close))  # nested tags are two
    return _parsed(text, contents, wrappers, unclosed, ends_clean,
                   lambda t: t.replace(open_, " ").replace(close, " "))


def parse_tags(text: str) -> ParsedAnswer:
    return _parse_pair(text, OPEN, CLOSE)


def parse_tool_call(text: str) -> ParsedAnswer:
    return _parse_pair(text, TOOL_OPEN, TOOL_CLOSE)


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


def _unnest(content: str) -> str:
    """A box's content with the boxes inside it unwrapped: the last inner box's content, recursively."""
    inner, _ = _boxes(content)
    return _unnest(inner[-1][0]) if inner else content


def parse_boxed(text: str) -> ParsedAnswer:
    """A box nested in a box (`\\boxed{\\boxed{4}}`, an artifact of the SDPO loop) is read like two boxes in
    a row: the answer is the innermost content (4, scored as `\\boxed{4} \\boxed{4}` is scored), and the
    two wrappers make it malformed (multiple answers), as nested tags are."""
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    boxes, unclosed = _boxes(text)
    ends_clean = bool(boxes) and _BOX_TAIL_RE.fullmatch(text[boxes[-1][2]:]) is not None
    nested = sum(len(_BOX_OPEN_RE.findall(c)) for c, _, _ in boxes)
    return _parsed(text, [_unnest(c) for c, _, _ in boxes], len(boxes) + nested, unclosed, ends_clean,
                   _strip_boxes)


# --- code: a fenced block ---------------------------------------------------------------------------

# an opening fence with an optional language tag, the code, a closing fence on its own line
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)


def parse_code(text: str) -> ParsedAnswer:
    """The last fenced block (```python ... ```, any or no language tag) is the program. Well formed:
    exactly one closed, non-empty block and nothing but whitespace after it. Lenient reading: the
    whole text, when it has no block at all (a model that writes bare code)."""
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    blocks = list(_FENCE_RE.finditer(text))
    unclosed = text.count(FENCE) % 2 == 1
    contents = [m.group(2) for m in blocks]
    last = contents[-1] if contents else None
    answer = last if last is not None and last.strip() else None
    trailing = bool(blocks) and text[blocks[-1].end():].strip() != ""
    lenient = (answer,) if answer is not None else ((text.strip(),) if text.strip() and not blocks else ())
    return ParsedAnswer(answer, len(blocks) == 1 and answer is not None and not unclosed and not trailing,
                        len(blocks), unclosed, last is not None and not last.strip(), False, trailing, lenient)


# --- react: Action / Action Input lines ------------------------------------------------------------

_ACTION_RE = re.compile(r"Action:\s*([^\n]*?)\s*\n\s*Action Input:\s*")


def _json_object_at(text: str, start: int) -> tuple[str | None, int]:
    """The brace-matched {...} starting at text[start] (strings respected), and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None, start
    depth, i, in_string = 0, start, False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1], i + 1
        i += 1
    return None, len(text)


def parse_react(text: str) -> ParsedAnswer:
    """Every `Action: NAME` line followed by `Action Input: {json}`; the strict answer is the JSON list of
    those calls. Well formed: at least one action, every input a closed, valid JSON object."""
    import json

    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    calls, broken, end = [], False, 0
    for m in _ACTION_RE.finditer(text):
        raw, end = _json_object_at(text, m.end())
        try:
            calls.append({"name": m.group(1).strip(), "arguments": json.loads(raw)} if raw else None)
        except json.JSONDecodeError:
            calls.append(None)
        broken = broken or calls[-1] is None
    good = [c for c in calls if c is not None]
    answer = json.dumps(good) if good else None
    trailing = bool(calls) and text[end:].strip() != ""
    return ParsedAnswer(answer, bool(calls) and not broken, len(calls), broken, False, False, trailing,
                        (answer,) if answer else ())


def render_react(answer: str) -> str:
    import json

    calls = json.loads(answer)
    calls = calls if isinstance(calls, list) else [calls]
    return "\n".join(f"Action: {c['name']}\nAction Input: {json.dumps(c['arguments'])}" for c in calls)


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
    short: bool = True
    """A short final answer that a run may ask for everywhere (`prompt.answer_format`); False for the
    shapes of structured answers that a data-set domain's verifier reads (code, tool calls)."""


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
    AnswerFormat("code", parse_code, lambda a: f"{FENCE}python\n{a.strip()}\n{FENCE}",
                 "Write your solution as Python code in one ```python code block.",
                 "Write a function seven() that returns the number of days in a week.",
                 "```python\ndef seven():\n    return 7\n```", (FENCE + "python", FENCE), "a ```python code block",
                 short=False),
    AnswerFormat("tool_call", parse_tool_call, lambda a: f"{TOOL_OPEN}{a}{TOOL_CLOSE}",
                 'Call the right tool: answer with {"name": ..., "arguments": {...}} as JSON inside '
                 "<tool_call></tool_call>.",
                 'Tools: days_in(unit: string). How many days are in a week?',
                 '<tool_call>{"name": "days_in", "arguments": {"unit": "week"}}</tool_call>',
                 (TOOL_CLOSE, TOOL_OPEN), "<tool_call></tool_call>", short=False),
    AnswerFormat("react", parse_react, render_react,
                 "Use the following format:\nAction: the tool to use\nAction Input: its input, as a JSON object.",
                 "Tools: days_in(unit). How many days are in a week?",
                 'Action: days_in\nAction Input: {"unit": "week"}', ("Action Input:", "Action:"),
                 "Action / Action Input lines", short=False),
)}
RUN_FORMATS = [name for name, f in FORMATS.items() if f.short]
"""The formats `prompt.answer_format` may name."""


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
