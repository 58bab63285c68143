"""Answer format: the final answer lives inside <answer>...</answer> at the end of a completion.

Extraction never raises, whatever the text: it is run on every sampled completion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPEN, CLOSE = "<answer>", "</answer>"
_ANSWER_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ParsedAnswer:
    answer: str | None
    """The content of the last complete answer tag, stripped; None if there is none."""
    well_formed: bool
    """Exactly one opening and one closing tag, in order, with nothing but whitespace after it."""


def parse_answer(text: str) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(None, False)
    matches = _ANSWER_RE.findall(text)
    answer = matches[-1].strip() if matches else None
    well_formed = (
        len(matches) == 1
        and text.count(OPEN) == 1
        and text.count(CLOSE) == 1
        and text.rstrip().endswith(CLOSE)
    )
    return ParsedAnswer(answer, well_formed)


def format_answer(answer: str) -> str:
    return f"{OPEN}{answer}{CLOSE}"
