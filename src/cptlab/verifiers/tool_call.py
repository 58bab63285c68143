"""The `tool_call` verifier: JSON function calls, {"name": ..., "arguments": {...}}, compared with
the item's expected calls by name and arguments.

Arguments compare order-insensitively and typed: numbers by value (3 == 3.0), strings exactly
("Paris" != "paris"), booleans only with booleans, lists in order, objects key by key. Arguments given
as a JSON-encoded string (OpenAI's layout) and the key `parameters` instead of `arguments` are read
too. The feedback names the first difference: "argument `city`: expected "Paris", got "paris"".

An item's `answer` is one call or a list of calls that must all be made, in any order (the answer then
holds a JSON list of calls, or the `react` format's several Action lines). Expected calls may come in
the layouts of the study's data: {"name", "arguments"}, {"function": {...}}, ToolAlpaca's {"Action",
"Action_Input"} and BFCL's possible answers {"func": {"arg": [acceptable values]}} ("" among them: the
argument may be left out). `tools` (the schema shown in the prompt) is optional; where given, a call of
a function it does not list says so.
"""

from __future__ import annotations

import json
from typing import Any

from . import register


def _load(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON ({e.msg} at character {e.pos})") from None
    return value


ANY_OF = "$any_of"
"""An expected argument given as {"$any_of": [values]} accepts any of them (BFCL's possible answers)."""


def normalize_call(value: Any, what: str = "call") -> dict:
    """{'name': str, 'arguments': dict} from a dict or JSON text in any of the layouts the module
    docstring names; ValueError naming what is wrong."""
    call = _load(value, what)
    if isinstance(call, list) and len(call) == 1:
        call = call[0]
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        call = call["function"]  # {"type": "function", "function": {...}}
    if isinstance(call, dict) and "Action" in call:  # ToolAlpaca: {"Action": name, "Action_Input": "<json>"}
        call = {"name": call["Action"], "arguments": call.get("Action_Input") or {}}
    if isinstance(call, dict) and len(call) == 1 and "name" not in call:  # BFCL: {"func": {"arg": [values]}}
        (name, args), = call.items()
        if isinstance(args, dict) and all(isinstance(v, list) for v in args.values()):
            return {"name": name, "arguments": {k: {ANY_OF: v} for k, v in args.items()}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"{what} is not an object with a string 'name'")
    args = call.get("arguments", call.get("parameters", {}))
    args = _load(args, f"{what}'s arguments") if isinstance(args, str) else args
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"{what}'s arguments are not an object")
    return {"name": call["name"], "arguments": args}


def normalize_calls(value: Any, what: str = "call") -> list[dict]:
    """A call or a list of calls, as a list of normalised calls."""
    value = _load(value, what)
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{what} is an empty list of calls")
        return [normalize_call(v, what) for v in value]
    return [normalize_call(value, what)]


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def difference(expected: Any, got: Any, path: str) -> str | None:
    """The first difference between two JSON values, as one line, or None if they are equal."""
    if isinstance(expected, dict) and set(expected) == {ANY_OF}:
        options = [v for v in expected[ANY_OF] if v != ""]
        if any(difference(v, got, path) is None for v in options):
            return None
        shown = " or ".join(json.dumps(v) for v in options[:3]) + (" or ..." if len(options) > 3 else "")
        return f"{path}: expected {shown}, got {json.dumps(got)}"
    if _type(expected) != _type(got):
        return f"{path}: expected {json.dumps(expected)} ({_type(expected)}), got {json.dumps(got)} ({_type(got)})"
    if isinstance(expected, dict):
        for key in expected:
            if key not in got:
                return f"{path}: missing key `{key}`"
        for key in got:
            if key not in expected:
                return f"{path}: unexpected key `{key}`"
        for key in expected:
            d = difference(expected[key], got[key], f"{path}.{key}")
            if d:
                return d
        return None
    if isinstance(expected, list):
        if len(expected) != len(got):
            return f"{path}: expected {len(expected)} items, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            d = difference(e, g, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return None if float(expected) == float(got) else f"{path}: expected {json.dumps(expected)}, got {json.dumps(got)}"
    return None if expected == got else f"{path}: expected {json.dumps(expected)}, got {json.dumps(got)}"


def call_difference(expected: dict, got: dict, reveal: bool = True) -> str | None:
    if got["name"] != expected["name"]:
        return f"called `{got['name']}`" + (f", expected `{expected['name']}`" if reveal else ", the wrong function")
    want, have = expected["arguments"], got["arguments"]
    for key in want:
        optional = isinstance(want[key], dict) and "" in want[key].get(ANY_OF, [None])
        if key not in have and not optional:
            return f"missing argument `{key}`"
    for key in have:
        if key not in want:
            return f"unexpected argument `{key}`"
    for key in want:
        if key not in have:
            continue
        d = difference(want[key], have[key], f"argument `{key}`")
        if d:
            return d if reveal else f"argument `{key}` is wrong"
    return None


def _tool_names(tools: Any) -> list[str]:
    tools = _load(tools, "tools")
    names = []
    for t in tools if isinstance(tools, list) else [tools]:
        if isinstance(t, dict):
            t = t.get("function", t)
            if isinstance(t.get("name"), str):
                names.append(t["name"])
    return names


def prepare_tool_call(item: dict) -> dict:
    """answer -> the list of calls to make ({'name', 'arguments'} each), from JSON text or objects."""
    return {**item, "answer": normalize_calls(item["answer"], "answer")}


def _reference(item: dict) -> str:
    calls = item["answer"]
    if any(ANY_OF in json.dumps(c) for c in calls):  # BFCL: the first acceptable value of each argument
        calls = [{"name": c["name"], "arguments": {k: v[ANY_OF][0] if isinstance(v, dict) and ANY_OF in v else v
                                                   for k, v in c["arguments"].items()
                                                   if not (isinstance(v, dict) and v.get(ANY_OF, [None])[0] == "")}}
                 for c in calls]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def calls_difference(expected: list[dict], got: list[dict], reveal: bool = True) -> str | None:
    """None if `got` makes exactly the expected calls (any order); else the first difference."""
    if len(got) != len(expected):
        return f"expected {len(expected)} call{'s' * (len(expected) != 1)}, got {len(got)}"
    left = list(got)
    for e in expected:
        match = next((g for g in left if call_difference(e, g, reveal) is None), None)
        if match is None:
            same = next((g for g in left if g["name"] == e["name"]), left[0])
            return call_difference(e, same, reveal)
        left.remove(match)
    return None


@register("tool_call", answer_format="tool_call", prepare=prepare_tool_call, reference=_reference,
          description="JSON function calls: names and arguments, order-insensitive, typed")
def tool_call(answer: str, item: dict, *, reveal: bool = True) -> tuple[bool, str]:
    try:
        got = normalize_calls(answer.strip(), "the call")
    except ValueError as e:
        return False, str(e)
    expected = item["answer"] if isinstance(item["answer"], list) and all(
        isinstance(c, dict) and set(c) == {"name", "arguments"} for c in item["answer"]) \
        else normalize_calls(item["answer"], "answer")
    problem = calls_difference(expected, got, reveal)
    if problem is None:
        return True, ""
    known = _tool_names(item["tools"]) if item.get("tools") else []
    unknown = [g["name"] for g in got if known and g["name"] not in known]
    if unknown:
        return False, f"there is no tool `{unknown[0]}` (tools: {', '.join(known)})"
    return False, problem
