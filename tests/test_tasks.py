import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptlab.errors import ConfigError
from cptlab.tasks import EVAL_POOL, all_domain_names, get_domain, make_split, verify
from cptlab.tasks.answer import FORMATS, parse_answer


def test_at_least_six_families_each_with_an_ood_variant():
    names = all_domain_names()
    base = [n for n in names if get_domain(n).ood_of is None]
    assert len({get_domain(n).family for n in base}) >= 6
    for n in base:
        assert get_domain(f"{n}_ood").ood_of == n


@pytest.mark.parametrize("name", all_domain_names())
def test_reference_solutions_verify_and_wrong_answers_fail(name):
    for ex in make_split(name, "eval", 8):
        assert verify(ex, ex.solution()).correct, ex
        assert verify(ex, ex.solution("answer_only")).reward == 1.0
        wrong = verify(ex, " <answer>definitely wrong</answer>")
        assert not wrong.correct and wrong.reward == 0.0 and "wrong" in wrong.feedback
        missing = verify(ex, "no tags at all")
        assert not missing.well_formed and missing.reward == 0.0 and missing.feedback


@pytest.mark.parametrize("name", all_domain_names())
def test_train_and_eval_splits_never_overlap(name):
    held_out = {e.question for e in make_split(name, "eval", EVAL_POOL)}
    train = make_split(name, "train", 400, seed=3)
    assert len(train) == 400
    assert not held_out & {e.question for e in train}


def test_splits_are_deterministic():
    a = make_split("sorting", "train", 20, seed=1)
    assert [e.question for e in a] == [e.question for e in make_split("sorting", "train", 20, seed=1)]
    assert [e.question for e in a] != [e.question for e in make_split("sorting", "train", 20, seed=2)]


def test_full_style_uses_reasoning_gym_question():
    ex = make_split("gcd", "eval", 1, style="full")[0]
    assert "Greatest Common Divisor" in ex.question and "<answer>" in ex.question
    assert verify(ex, f"<answer>{ex.answer}</answer>", style="full").correct


def test_unknown_domain():
    with pytest.raises(ConfigError, match="domain"):
        get_domain("poetry")


def test_parse_answer_cases():
    assert parse_answer("x <answer> 12 </answer>") .answer == "12"
    assert parse_answer("x <answer>12</answer>").well_formed
    p = parse_answer("<answer>1</answer><answer>2</answer>")
    assert p.answer == "2" and not p.well_formed
    assert parse_answer("<answer>3").answer is None
    assert not parse_answer("<answer>3</answer> trailing").well_formed


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_extraction_never_crashes_on_arbitrary_text(text):
    for fmt in FORMATS:
        for t in (text, f"\\boxed{{{text}", f"<answer>{text}</answer>{text}"):
            parsed = parse_answer(t, fmt)
            assert parsed.answer is None or isinstance(parsed.answer, str)
            assert all(isinstance(c, str) and c for c in parsed.lenient)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_verify_never_crashes(text):
    ex = make_split("sorting", "eval", 1)[0]
    for t in (text, f"<answer>{text}</answer>"):
        v = verify(ex, t)
        assert v.reward in (0.0, 1.0)
