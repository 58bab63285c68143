import copy

import torch

from cptlab.config import PromptConfig, SDPOConfig
from cptlab.prompts import student_prompt, teacher_prompt
from cptlab.tasks import Verdict, make_split
from cptlab.teacher import Teacher, build_reprompts, ema_update

P = PromptConfig()


def _verdict(ok: bool, ans="5"):
    return Verdict(1.0 if ok else 0.0, ok, True, ans, "" if ok else f"answer {ans} is wrong")


def _group(oks):
    ex = make_split("arithmetic", "eval", 1)[0]
    comps = [f" c{i} <answer>{i}</answer>" for i in range(len(oks))]
    return [ex] * len(oks), comps, [_verdict(o, str(i)) for i, o in enumerate(oks)]


def test_prompts_layout():
    assert student_prompt(P, "2+2") == "Q: 2+2\nA:"
    assert teacher_prompt(P, "2+2", " 4 <answer>4</answer>", None) == "Q: 2+2\nDemo: 4 <answer>4</answer>\nA:"
    assert teacher_prompt(P, "2+2", None, "answer 5 is wrong") == "Q: 2+2\nFeedback: answer 5 is wrong\nA:"


def test_sibling_demo_skips_self_and_uses_first_success():
    exs, comps, verdicts = _group([True, False, True, False])
    rep = build_reprompts(exs, comps, verdicts, [0] * 4, SDPOConfig(), P)
    q = exs[0].question
    # row 0 succeeded: its own completion is skipped, the first other success (row 2) is the demo
    assert rep.texts[0] == teacher_prompt(P, q, comps[2], None)
    assert rep.texts[1] == teacher_prompt(P, q, comps[0], None)  # feedback only without a solution
    assert rep.texts[2] == teacher_prompt(P, q, comps[0], None)
    assert rep.distill == [True] * 4
    assert rep.stats["teacher/with_demo_frac"] == 1.0


def test_lone_success_and_no_success_cases():
    exs, comps, verdicts = _group([True, False])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(), P)
    # the lone success has no other demo and no feedback: dropped; the failure gets the success as demo
    assert rep.distill == [False, True]
    exs, comps, verdicts = _group([False, False])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(), P)
    assert rep.distill == [True, True]
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, None, "answer 0 is wrong")
    assert rep.stats["teacher/feedback_only_frac"] == 1.0
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(no_demo="skip"), P)
    assert rep.distill == [False, False] and rep.stats["teacher/dropped_frac"] == 1.0


def test_siblings_are_the_rows_with_the_same_group_id():
    exs, comps, verdicts = _group([False, False, True, True])
    # groups interleaved: rows 0 and 2 form group 7, rows 1 and 3 group 3
    rep = build_reprompts(exs, comps, verdicts, [7, 3, 7, 3], SDPOConfig(), P)
    q = exs[0].question
    assert rep.texts[0] == teacher_prompt(P, q, comps[2], None)  # its sibling in group 7 succeeded
    assert rep.texts[1] == teacher_prompt(P, q, comps[3], None)
    assert rep.distill == [True, True, False, False]  # the successes have no other success to learn from


def test_answer_only_demo_reference_source_and_feedback_with_solution():
    exs, comps, verdicts = _group([False, True])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(demo_content="answer_only"), P)
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, " <answer>1</answer>", None)
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(demo_source="reference"), P)
    assert rep.texts[1] == teacher_prompt(P, exs[0].question, exs[0].solution(), None)
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(feedback_only_without_solution=False), P)
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, comps[1], "answer 0 is wrong")
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, SDPOConfig(skip_self_success=False), P)
    assert rep.texts[1] == teacher_prompt(P, exs[0].question, comps[1], None)


def test_ema_update_formula(tiny_model):
    student = tiny_model
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.05)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.95 * t0 + 0.05 * s)


def test_teacher_modes(tiny_model):
    x = torch.randint(0, 50, (2, 5))
    fwd = lambda m: m(input_ids=x).logits
    cur = Teacher("current", tiny_model)
    assert cur.copy is None  # no extra weights kept
    frozen = Teacher("frozen", tiny_model)
    ema = Teacher("ema", tiny_model, ema_rate=0.5)
    tr = Teacher("trust_region", tiny_model, mix_coef=0.25)
    ref_logits = fwd(tiny_model).detach()
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.5)
    new_logits = fwd(tiny_model).detach()
    torch.testing.assert_close(cur.logits(fwd), new_logits)
    torch.testing.assert_close(frozen.logits(fwd), ref_logits)
    torch.testing.assert_close(tr.logits(fwd), torch.lerp(ref_logits, new_logits, 0.25))
    frozen.update()
    torch.testing.assert_close(frozen.logits(fwd), ref_logits)
    ema.update()
    for t, s in zip(ema.copy.parameters(), tiny_model.parameters()):
        torch.testing.assert_close(t, s / 1.5 * 0.5 + s * 0.5)


def test_ema_teacher_from_base_starts_at_the_base_and_follows_the_student(tiny_model):
    base = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)  # the student moved away from the base (a later stage)
    ema = Teacher("ema", tiny_model, ema_rate=0.25, base=base, source="base")
    assert all(torch.equal(t, b) for t, b in zip(ema.copy.parameters(), base.parameters()))
    assert ema.state_dict() is not None  # its own copy: a checkpoint keeps it
    base_before = [p.clone() for p in base.parameters()]
    ema.update()
    for t, b, s in zip(ema.copy.parameters(), base_before, tiny_model.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    assert all(torch.equal(b0, b1) for b0, b1 in zip(base_before, base.parameters()))  # the base stays put
    frozen = Teacher("frozen", tiny_model, base=base, source="base")
    assert frozen.copy is base and frozen.state_dict() is None  # the base itself, nothing to checkpoint
