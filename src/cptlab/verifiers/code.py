"""The `code` verifier: the completion's program runs against the item's tests in the sandbox.

An item carries its tests in one of these layouts:
  test + entry_point   HumanEval's: a program defining `check(candidate)`; it runs as `check(<entry_point>)`
  tests                a list of lines such as "assert add(1, 2) == 3" (MBPP, Dolci's ground_truth), or
                       of {"input": ..., "output": ...} pairs: the program reads stdin and its stdout
                       must equal the output (whitespace at line ends ignored); or LiveCodeBench's
                       {"inputs": [...], "outputs": [...], "testtype": "stdin" | "functional", "fn_name"}
                       (also as JSON text), where a functional test calls fn_name (a method of class
                       Solution, or a function) with one JSON argument per input line and compares the
                       JSON result
and optionally `prefix`, code placed before the answer (HumanEval's prompt: its imports and the
signature, so that a completion holding only the body also runs). The answer is the content of the
last ```python block. Every program runs in its own sandboxed process (sandbox.py) with a pool of
workers, so a batch of 256 answers does not run one after another. The feedback is the failing test's
line and the exception, then the tail of stderr, as a test runner prints them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import TYPE_CHECKING

from . import cap, register

if TYPE_CHECKING:
    from .sandbox import ProgramResult

STDERR_TAIL = 400
"""Characters of stderr's tail kept in the feedback after the failing line."""

_FRAME = re.compile(r'File "[^"]*program\.py", line (\d+)(?:, in (\S+))?')


def _io_tests(item: dict) -> list[dict] | None:
    tests = item.get("tests")
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        return tests
    return None


def _from_lcb(tests: dict) -> list[dict]:
    """LiveCodeBench's {"inputs", "outputs", "testtype", "fn_name"} as input/output pairs."""
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError("tests: expected equally long 'inputs' and 'outputs' lists")
    kind = tests.get("testtype", "stdin")
    if kind == "functional" and not tests.get("fn_name"):
        raise ValueError("tests: a functional test needs fn_name")
    if kind == "code":  # a program to run after the answer (the study's HumanEval+ layout)
        return [{"program": str(i)} for i in inputs]
    return [{"input": str(i), "output": str(o), **({"fn_name": tests["fn_name"]} if kind == "functional" else {})}
            for i, o in zip(inputs, outputs)]


def prepare_code(item: dict) -> dict:
    tests, test = item.get("tests"), item.get("test")
    if not test and not tests:
        raise ValueError("no tests: expected `test` (a program defining check(candidate), with entry_point) "
                         "or `tests` (assert lines, input/output pairs or LiveCodeBench's inputs/outputs)")
    if test and "def check" in str(test) and not item.get("entry_point"):
        raise ValueError("`test` defines check(candidate) but there is no entry_point (the function to check)")
    if tests is not None:
        if isinstance(tests, str) and tests.strip()[:1] in "[{":
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError as e:
                raise ValueError(f"tests: not valid JSON ({e.msg})") from None
        if isinstance(tests, str):
            tests = [line for line in tests.splitlines() if line.strip()]
        if isinstance(tests, dict):
            tests = _from_lcb(tests)
        if not isinstance(tests, list) or not tests or not all(isinstance(t, (str, dict)) for t in tests):
            raise ValueError("tests: expected a non-empty list of assert lines or of {input, output} pairs")
        for t in tests:
            if isinstance(t, dict) and not ({"input", "output"} <= set(t) or "program" in t):
                raise ValueError(f"tests: an input/output pair needs both keys, got {sorted(t)}")
        item = {**item, "tests": tests}
    return item


_CALL = """
import json as _json, sys as _sys
_args = [_json.loads(_line) for _line in _sys.stdin.read().split("\\n") if _line.strip()]
_fn = getattr(Solution(), {name!r}) if "Solution" in globals() else globals()[{name!r}]
print(_json.dumps(_fn(*_args)))
"""


def _reference(item: dict) -> str:
    answer = str(item.get("answer") or "")
    prefix, entry = str(item.get("prefix") or ""), item.get("entry_point")
    if prefix and not (entry and re.search(rf"def\s+{re.escape(str(entry))}\s*\(", answer)):
        return prefix + answer
    return answer


def programs(code: str, item: dict, done: str = "") -> list[tuple[str, str, dict | None]]:
    """(source, stdin, io test) of each program to run for this answer: one for assert-style tests,
    one per input/output pair otherwise. A program that runs tests ends by printing `done`, so that an
    answer which exits early (os._exit(0) before the tests) does not pass."""
    head = (str(item.get("prefix") or "") + "\n" + code).strip("\n") + "\n"
    after = f"\nprint({done!r})\n" if done else "\n"
    io = _io_tests(item)
    if io is not None:
        out = []
        for t in io:
            if "program" in t:
                out.append((head + "\n\n" + t["program"] + after, "", {"done": done}))
            elif "fn_name" in t:
                out.append((head + _CALL.format(name=t["fn_name"]), str(t["input"]), t))
            else:
                out.append((head, str(t["input"]), t))
        return out
    if item.get("test"):
        test = str(item["test"])
        call = f"\n\ncheck({item['entry_point']})" if "def check" in test else ""
        return [(head + "\n\n" + test + call + after, "", {"done": done})]
    return [(head + "\n\n" + "\n".join(str(t) for t in item["tests"]) + after, "", {"done": done})]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _same_output(stdout: str, io: dict) -> bool:
    if "done" in io:  # assert-style tests: they all ran when the program printed the marker last
        return not io["done"] or (stdout.strip().splitlines() or [""])[-1] == io["done"]
    if "fn_name" not in io:
        return _lines(stdout) == _lines(str(io["output"]))
    try:  # a functional test: the JSON values, typed as the tool_call verifier compares them
        from .tool_call import difference

        return difference(json.loads(str(io["output"])), json.loads(stdout.strip().splitlines()[-1]), "") is None
    except (ValueError, IndexError):
        return False


def failure(source: str, result: ProgramResult, io: dict | None) -> str | None:
    """None if the program passed; else the feedback line(s)."""
    if result.status == "ok":
        if io is None or _same_output(result.stdout, io):
            return None
        if "done" in io:
            return "the program ended before its tests finished (it exited early)"
        return (f"input {str(io['input'])[:120]!r}: expected output {str(io['output']).strip()[:120]!r}, "
                f"got {result.stdout.strip()[:120]!r}")
    if result.status in ("timeout", "memory", "blocked", "error"):
        return result.reason
    frames = _FRAME.findall(result.stderr)
    lines = source.splitlines()
    where = ""
    if frames:
        number = int(frames[-1][0])
        if 1 <= number <= len(lines):
            where = f"failed at `{lines[number - 1].strip()[:160]}`: "
    last = result.reason or (result.stderr.strip().splitlines() or ["exit code " + str(result.returncode)])[-1]
    tail = re.sub(r'File "[^"]*program\.py"', 'File "program.py"', result.stderr.strip())[-STDERR_TAIL:]
    return f"{where}{last}\n{tail}" if tail and tail.strip() != last.strip() else f"{where}{last}"


def run_tests(answers: list[str], items: list[dict], *, timeout: float = 10.0, memory_mb: int = 1024,
              max_io_tests: int = 20, workers: int | None = None) -> list[tuple[bool, str]]:
    """(passed, feedback) of each answer; all programs of the batch go to one pool."""
    from .sandbox import SandboxLimits, run_programs

    done = "tests-done-" + secrets.token_hex(8)  # unknown to the program, so it cannot print it early
    jobs, owner = [], []
    for k, (code, item) in enumerate(zip(answers, items)):
        for job in programs(code, item, done)[:max_io_tests]:
            jobs.append(job)
            owner.append(k)
    workers = workers or os.cpu_count() or 1
    # RLIMIT_NPROC counts every sandboxed process and thread on the machine, so it grows with the pool
    limits = SandboxLimits(wall_seconds=timeout, cpu_seconds=max(1, int(timeout)), memory_mb=memory_mb,
                           max_processes=16 * workers)
    results = run_programs([source for source, _, _ in jobs], stdins=[stdin for _, stdin, _ in jobs],
                           limits=limits, workers=workers)
    out: list[tuple[bool, str]] = [(True, "")] * len(answers)
    for (source, _, io), result, k in zip(jobs, results, owner):
        if out[k][0]:
            problem = failure(source, result, io)
            if problem is not None:
                out[k] = (False, cap(problem))
    return out


register("code", answer_format="code", needs=(), prepare=prepare_code, batch=run_tests, lenient=False,
         reference=_reference,
         description="runs the program against the item's tests in a sandboxed subprocess")(None)
