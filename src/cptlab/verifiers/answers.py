"""Verifiers of a short final answer: exact, numeric, math, choice, regex.

Each compares the strict answer (the content of the answer format's wrapper) with the item's
`answer` (a list of acceptable answers also works) and says what was wrong. `reveal` (default true)
puts the expected answer into the feedback, as an environment's error message does ("3/5 is not equal
to the expected 0.75"); false keeps it to "answer 3/5 is wrong".
"""

from __future__ import annotations

import math
import re
import string
import threading
from fractions import Fraction

from . import register


def _expected(item: dict) -> list[str]:
    answer = item["answer"]
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def _wrong(answer: str, expected: str, reveal: bool, relation: str = "is not equal to") -> str:
    shown = answer if len(answer) <= 80 else answer[:77] + "..."
    return f"{shown} {relation} the expected {expected}" if reveal else f"answer {shown} is wrong"


# --- exact -----------------------------------------------------------------------------------------

_MATH_DELIMS = re.compile(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    """Whitespace collapsed, surrounding quotes, math delimiters and end punctuation removed."""
    text = _MATH_DELIMS.sub("", " ".join(str(text).split())).strip()
    text = re.sub(r"^[\"'`\s]+|[\"'`.!\s]+$", "", text)
    return text if case_sensitive else text.lower()


@register("exact", description="normalised string equality (case, whitespace, quotes, end punctuation)")
def exact(answer: str, item: dict, *, case_sensitive: bool = False, reveal: bool = True) -> tuple[bool, str]:
    got = normalize_text(answer, case_sensitive)
    expected = _expected(item)
    if any(got == normalize_text(e, case_sensitive) for e in expected):
        return True, ""
    return False, _wrong(repr(answer.strip()), repr(expected[0]), reveal, "does not match")


# --- numeric ---------------------------------------------------------------------------------------

_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_number(text: str) -> Fraction | float | None:
    """A number as written in an answer: '0.75', '3/4', '\\frac{3}{4}', '-1,000', '2.5e3', '75%'
    (read as 75), 'x = 4' (the right-hand side), '$4$'. None if it is not one number."""
    t = normalize_text(text)
    if "=" in t:
        t = t.rsplit("=", 1)[1].strip()
    t = _THOUSANDS.sub("", t).replace(" ", "").replace("\\!", "").replace("{,}", "")
    t = t.rstrip("%").replace("\\%", "")
    m = _FRAC.match(t)
    if m:
        t = f"{m.group(1)}/{m.group(2)}"
    m = re.fullmatch(rf"({_NUM})/({_NUM})", t)
    try:
        if m:
            den = Fraction(m.group(2))
            return Fraction(m.group(1)) / den if den else None
        if re.fullmatch(_NUM, t):
            value = float(t)
            return Fraction(t) if "e" not in t.lower() and math.isfinite(value) else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


@register("numeric", description="one number, within a tolerance; fractions, LaTeX \\frac, thousands separators")
def numeric(answer: str, item: dict, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
            reveal: bool = True) -> tuple[bool, str]:
    got = parse_number(answer)
    expected = _expected(item)
    if got is None:
        return False, f"{answer.strip()[:80]!r} is not a number"
    for e in expected:
        want = parse_number(e)
        if want is None:
            raise ValueError(f"the expected answer {e!r} is not a number")
        if math.isclose(float(got), float(want), rel_tol=rel_tol, abs_tol=abs_tol):
            return True, ""
    return False, _wrong(answer.strip(), expected[0], reveal)


# --- math (math-verify) ----------------------------------------------------------------------------


def _as_latex(text: str) -> str:
    text = str(text).strip()
    return text if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text else f"${text}$"


def _math_parse(text: str):
    from math_verify import parse

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return parse(_as_latex(text), parsing_timeout=timeout)


@register("math", description="LaTeX and symbolic equivalence by math-verify (what TRL and verl use)")
def math_equal(answer: str, item: dict, *, reveal: bool = True) -> tuple[bool, str]:
    from math_verify import verify

    got = _math_parse(answer)
    if not got:
        return False, f"could not read {answer.strip()[:80]!r} as a number or expression"
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    for e in _expected(item):
        gold = _math_parse(e)
        if not gold:
            raise ValueError(f"the expected answer {e!r} does not parse as math")
        if verify(gold, got, timeout_seconds=timeout):
            return True, ""
    return False, _wrong(answer.strip(), _expected(item)[0], reveal)


# --- choice ----------------------------------------------------------------------------------------

LETTERS = string.ascii_uppercase


def _choices(value) -> list[str]:
    """Options as a list of texts, from a list, {'text': [...], 'label': [...]}, {'A': text, ...} or
    'A. x\\nB. y' lines."""
    if isinstance(value, dict) and "text" in value:
        labels = list(value.get("label") or LETTERS[:len(value["text"])])
        if labels != list(LETTERS[:len(labels)]):
            order = sorted(range(len(labels)), key=lambda i: str(labels[i]))
            return [str(value["text"][i]) for i in order]
        return [str(t) for t in value["text"]]
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, str):
        lines = [re.sub(r"^\(?[A-Z][.):]\s*", "", line.strip()) for line in value.splitlines() if line.strip()]
        return lines
    return [str(v) for v in value]


def prepare_choice(item: dict) -> dict:
    """choices -> a list of option texts; answer -> its letter (from a letter, an index or the text)."""
    choices = _choices(item["choices"])
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"choices: expected 2 to 26 options, got {len(choices)}")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise ValueError(f"answer {answer!r}: expected an option letter, index or text")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(choices):
            raise ValueError(f"answer index {index}: expected 0 to {len(choices) - 1}")
        letter = LETTERS[index]
    else:
        letter = read_choice(answer, choices)
        if letter is None:
            raise ValueError(f"answer {answer!r} names none of the {len(choices)} options")
    return {**item, "choices": choices, "answer": letter}


_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|\.|:|\s|$)")
_SAID_LETTER = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b\)?", re.IGNORECASE)


def read_choice(text: str, choices: list[str]) -> str | None:
    """The option letter an answer names: 'B', '(B)', 'B.', 'B) Paris', 'The answer is B', or the text
    of exactly one option ('Paris'). None if it names none of them."""
    t = normalize_text(text, case_sensitive=True)
    valid = LETTERS[:len(choices)]
    m = _LEADING_LETTER.match(t) or _SAID_LETTER.search(t)
    if m and m.group(1).upper() in valid and (m.re is _LEADING_LETTER or m.group(1).isupper()):
        return m.group(1).upper()
    matches = [LETTERS[i] for i, c in enumerate(choices) if normalize_text(c) == normalize_text(t)]
    return matches[0] if len(matches) == 1 else None


@register("choice", needs=("answer", "choices"), prepare=prepare_choice,
          description="multiple choice: an option letter ('B', '(B)', 'The answer is B') or the option's text")
def choice(answer: str, item: dict, *, reveal: bool = True) -> tuple[bool, str]:
    choices = item["choices"]
    letter = read_choice(answer, choices)
    if letter is None:
        return False, f"{answer.strip()[:80]!r} names none of the options {LETTERS[0]}-{LETTERS[len(choices) - 1]}"
    if letter == item["answer"]:
        return True, ""
    if not reveal:
        return False, f"option {letter} is wrong"
    right = item["answer"]
    return False, f"option {letter} is wrong; the correct option is {right} ({choices[LETTERS.index(right)][:80]})"


# --- regex -----------------------------------------------------------------------------------------


@register("regex", needs=(), description="the answer matches a regular expression (the item's answer, or the pattern option)")
def regex(answer: str, item: dict, *, pattern: str = "", ignore_case: bool = False,
          reveal: bool = True) -> tuple[bool, str]:
    if not pattern and item.get("answer") in (None, ""):
        raise ValueError("no pattern: expected the item's answer or the verifier option `pattern`")
    expr = pattern or str(item["answer"])
    if re.fullmatch(expr, answer.strip(), re.IGNORECASE if ignore_case else 0):
        return True, ""
    return False, _wrong(repr(answer.strip()), f"pattern /{expr}/", reveal, "does not match")
