import copy

import pytest
import torch

from cptlab.config import MethodConfig, PromptConfig, RepromptConfig, RolloutConfig
from cptlab.methods import MethodContext, build_method
from cptlab.prompts import student_prompt, teacher_prompt
from cptlab.tasks import Verdict, make_split
from cptlab.teacher import make_teacher, build_reprompts, ema_update, remove_thinking, restart_points
from helpers import sdpo_config

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
    rep = build_reprompts(exs, comps, verdicts, [0] * 4, RepromptConfig(), P)
    q = exs[0].question
    # row 0 succeeded: its own completion is skipped, the first other success (row 2) is the demo
    assert rep.texts[0] == teacher_prompt(P, q, comps[2], None)
    assert rep.texts[1] == teacher_prompt(P, q, comps[0], None)  # feedback only without a solution
    assert rep.texts[2] == teacher_prompt(P, q, comps[0], None)
    assert rep.distill == [True] * 4
    assert rep.stats["teacher/with_demo_frac"] == 1.0


def test_lone_success_and_no_success_cases():
    exs, comps, verdicts = _group([True, False])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(), P)
    # the lone success has no other demo and no feedback: dropped; the failure gets the success as demo
    assert rep.distill == [False, True]
    exs, comps, verdicts = _group([False, False])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(), P)
    assert rep.distill == [True, True]
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, None, "answer 0 is wrong")
    assert rep.stats["teacher/feedback_only_frac"] == 1.0
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(no_demo="skip"), P)
    assert rep.distill == [False, False] and rep.stats["teacher/dropped_frac"] == 1.0


def test_siblings_are_the_rows_with_the_same_group_id():
    exs, comps, verdicts = _group([False, False, True, True])
    # groups interleaved: rows 0 and 2 form group 7, rows 1 and 3 group 3
    rep = build_reprompts(exs, comps, verdicts, [7, 3, 7, 3], RepromptConfig(), P)
    q = exs[0].question
    assert rep.texts[0] == teacher_prompt(P, q, comps[2], None)  # its sibling in group 7 succeeded
    assert rep.texts[1] == teacher_prompt(P, q, comps[3], None)
    assert rep.distill == [True, True, False, False]  # the successes have no other success to learn from


def test_answer_only_demo_reference_source_and_feedback_with_solution():
    exs, comps, verdicts = _group([False, True])
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(demo_content="answer_only"), P)
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, " <answer>1</answer>", None)
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(demo_source="reference"), P)
    assert rep.texts[1] == teacher_prompt(P, exs[0].question, exs[0].solution(), None)
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(feedback_only_without_solution=False), P)
    assert rep.texts[0] == teacher_prompt(P, exs[0].question, comps[1], "answer 0 is wrong")
    rep = build_reprompts(exs, comps, verdicts, [0] * 2, RepromptConfig(skip_self_success=False), P)
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
    cur = make_teacher("current", tiny_model)
    assert cur.copy is None  # no extra weights kept
    frozen = make_teacher("frozen", tiny_model)
    ema = make_teacher("ema", tiny_model, ema_rate=0.5)
    tr = make_teacher("trust_region", tiny_model, mix_coef=0.25)
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
    ema = make_teacher("ema", tiny_model, ema_rate=0.25, base=base, source="base")
    assert all(torch.equal(t, b) for t, b in zip(ema.copy.parameters(), base.parameters()))
    assert ema.state_dict().keys() == {"teacher"}  # its own copy: a checkpoint keeps it
    base_before = [p.clone() for p in base.parameters()]
    ema.update()
    for t, b, s in zip(ema.copy.parameters(), base_before, tiny_model.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    assert all(torch.equal(b0, b1) for b0, b1 in zip(base_before, base.parameters()))  # the base stays put
    frozen = make_teacher("frozen", tiny_model, base=base, source="base")
    assert frozen.copy is base and frozen.state_dict() == {}  # the base itself, nothing to checkpoint


# -- thinking removed from demonstrations ----------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>a\nb</think>\n\n 6 <answer>6</answer>", "6 <answer>6</answer>"),  # a block, its whitespace after
    ("<think>x</think> A <think>y</think>B", "A B"),  # every block
    ("let me see\n12 / 4 = 3\n</think>\n\n<answer>3</answer>", "<answer>3</answer>"),  # a lone </think>
    ("<think>a</think>b</think> c", "c"),  # a lone </think> left after the blocks
    (" 36 21 15 6 3 0 <answer>3</answer>", " 36 21 15 6 3 0 <answer>3</answer>"),  # no thinking: unchanged
    ("<think> still thinking when the budget ran out", "<think> still thinking when the budget ran out"),
    ("", ""),
])
def test_remove_thinking(text, expected):
    assert remove_thinking(text) == expected


def test_demonstrations_lose_their_thinking_unless_turned_off():
    exs, comps, verdicts = _group([False, True, False])
    comps[1] = "I add them.</think>\n <answer>1</answer>"
    q = exs[0].question
    rep = build_reprompts(exs, comps, verdicts, [0] * 3, RepromptConfig(), P)
    assert rep.texts[0] == rep.texts[2] == teacher_prompt(P, q, "<answer>1</answer>", None)
    assert rep.stats["teacher/thinking_removed_frac"] == pytest.approx(2 / 3)  # 2 demonstrations of 3 rows
    rep = build_reprompts(exs, comps, verdicts, [0] * 3, RepromptConfig(remove_thinking=False), P)
    assert rep.texts[0] == teacher_prompt(P, q, comps[1], None)
    assert rep.stats["teacher/thinking_removed_frac"] == 0.0


# -- the stable teacher (StableSDPO, our reading) ---------------------------------------------------

def _fill(model, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _teacher_values(teacher) -> set[float]:
    return {round(v, 6) for p in teacher.copy.parameters() for v in p.unique().tolist()}


def test_stable_teacher_mixes_base_and_student_at_build_and_restarts_then_stays_frozen(tiny_model):
    base = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    _fill(base, 1.0)
    _fill(tiny_model, 2.0)
    teacher = make_teacher("stable", tiny_model, base=base, gamma=0.4, anchor="base", restart_after=frozenset({2}))
    assert _teacher_values(teacher) == {1.4}  # 0.6 * 1 + 0.4 * 2
    _fill(tiny_model, 3.0)
    teacher.update()  # one batch done: no restart, frozen
    assert _teacher_values(teacher) == {1.4}
    teacher.update()  # two: restart from the student now
    assert _teacher_values(teacher) == {1.8}  # 0.6 * 1 + 0.4 * 3
    _fill(tiny_model, 5.0)
    teacher.update()
    assert _teacher_values(teacher) == {1.8}
    assert _teacher_values(make_teacher("stable", tiny_model, base=base, gamma=0.0)) == {1.0}  # gamma 0: the anchor
    assert _teacher_values(make_teacher("stable", tiny_model, base=base, gamma=1.0)) == {5.0}  # gamma 1: the student
    assert all(float(p.unique()) == 1.0 for p in base.parameters())  # the anchor itself is untouched


def test_stable_teacher_from_the_stage_start_keeps_its_anchor_for_the_restarts(tiny_model):
    _fill(tiny_model, 2.0)
    teacher = make_teacher("stable", tiny_model, gamma=0.4, anchor="stage_start", restart_after=frozenset({1}))
    assert _teacher_values(teacher) == {2.0}  # the anchor is the student at the build
    _fill(tiny_model, 5.0)
    teacher.update()
    assert _teacher_values(teacher) == {3.2}  # 0.6 * 2 + 0.4 * 5
    state = teacher.state_dict()
    assert state.keys() == {"teacher", "teacher_anchor", "teacher_schedule"}
    assert {float(t.unique()) for t in state["teacher_anchor"].values()} == {2.0}
    assert int(state["teacher_schedule"]["batches"]) == 1
    # no restart scheduled: the anchor is not kept (nor checkpointed), the teacher is the stage start
    once = make_teacher("stable", tiny_model, gamma=0.4, anchor="stage_start")
    assert once.anchor is None and "teacher_anchor" not in once.state_dict()
    with pytest.raises(ValueError, match="base model"):
        make_teacher("stable", tiny_model, anchor="base")


def test_stable_teacher_state_restores_weights_anchor_and_clock(tiny_model):
    _fill(tiny_model, 2.0)
    teacher = make_teacher("stable", tiny_model, gamma=0.5, anchor="stage_start", restart_after=frozenset({1, 3}))
    _fill(tiny_model, 4.0)
    teacher.update()  # restart: 3.0
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in teacher.state_dict().items()}
    # a resumed stage builds its method from the resumed student (here 4.0), then loads the checkpoint
    resumed = make_teacher("stable", tiny_model, gamma=0.5, anchor="stage_start", restart_after=frozenset({1, 3}))
    assert _teacher_values(resumed) == {4.0}
    resumed.load_state_dict(saved)
    assert _teacher_values(resumed) == {3.0} and resumed.batches == 1
    _fill(tiny_model, 6.0)
    resumed.update()
    assert _teacher_values(resumed) == {3.0}
    resumed.update()  # the third batch: restart toward the stage-start anchor 2.0, not the resumed student
    assert _teacher_values(resumed) == {4.0}  # 0.5 * 2 + 0.5 * 6
    with pytest.raises(ValueError, match="anchor"):
        resumed.load_state_dict({**saved, "teacher_anchor": {}})


def test_restart_points():
    assert restart_points(10, 3, []) == {3, 6, 9}
    assert restart_points(10, 0, [0.5]) == {5}
    assert restart_points(100, 0, [0.29]) == {29}  # nearest step: 0.29 * 100 = 28.999...
    assert restart_points(10, 5, [0.3, 0.5]) == {3, 5}
    assert restart_points(10, 0, []) == restart_points(10, 10, []) == restart_points(4, 0, [0.99]) == frozenset()
    assert restart_points(0, 2, [0.5]) == frozenset()


def test_sdpo_method_schedules_stable_restarts_from_its_config_and_the_stage_length(tiny_model, tokenizer):
    base = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    cfg = MethodConfig(name="sdpo", sdpo=sdpo_config(teacher_mode="stable", stable_gamma=0.25, stable_restart_every=4,
                                                     stable_restart_at=[0.5]))
    ctx = MethodContext(tokenizer, PromptConfig(), RolloutConfig(), torch.device("cpu"), base=base, stage_steps=10)
    method = build_method(cfg, ctx, tiny_model)
    assert method.teacher.restart_after == {4, 5, 8} and method.teacher.gamma == 0.25
    assert method.state_dict().keys() == {"teacher", "teacher_schedule"}  # the base anchor is not checkpointed


# -- a whole run: killed after a restart, resumed ----------------------------------------------------

STABLE_RUN = ["stages=[{domain: arithmetic, steps: 5, method: {name: sdpo}}]", "method.lr=1e-3",
              "method.warmup_steps=0", "method.sdpo.teacher_mode=stable", "method.sdpo.stable_anchor=stage_start",
              "method.sdpo.stable_restart_every=2", "run.checkpoint_every=3", "run.keep_checkpoints=2"]


def test_stable_teacher_run_killed_after_a_restart_resumes_to_the_same_records(tmp_path):
    """Restarts after batches 2 and 4 (from the student and the stage-start anchor); checkpoint at 3,
    killed while drawing step 5: the resumed run must rebuild the same teacher at 4 (the anchor and the
    clock come from the checkpoint), so every train record matches the uninterrupted run's."""
    from safetensors.torch import load_file

    from cptlab.api import run_continual
    from helpers import records, run_until_crash, tiny_config

    full = run_continual(tiny_config(*STABLE_RUN), out_dir=str(tmp_path / "full"))
    killed = tmp_path / "killed"
    run_until_crash(tiny_config(*STABLE_RUN), killed, stage=1, step=4)
    ckpt = killed / "checkpoints" / "stage1-step3"
    assert int(load_file(str(ckpt / "teacher_schedule.safetensors"))["batches"]) == 3
    assert (ckpt / "teacher_anchor.safetensors").is_file()
    assert [r["step"] for r in records(killed) if r["event"] == "train"] == [1, 2, 3, 4]
    run_continual(resume=str(killed))
    train = [r for r in records(full) if r["event"] == "train"]
    assert [r for r in records(killed) if r["event"] == "train"] == train and len(train) == 5
    assert records(killed) == records(full)
    assert len({r["sdpo/divergence"] for r in train}) == 5  # a distillation signal that the teacher shapes


def test_stable_ema_mixes_once_then_follows_the_student(tiny_model):
    """The authors' StableSDPO: theta_T = (1 - gamma) base + gamma student at the start, then an EMA."""
    base = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.fill_(1.0)
        for p in tiny_model.parameters():
            p.fill_(5.0)
    teacher = make_teacher("stable_ema", tiny_model, base=base, gamma=0.25, ema_rate=0.5)
    assert _teacher_values(teacher) == {2.0}  # 0.75 * 1 + 0.25 * 5
    teacher.update()
    assert _teacher_values(teacher) == {3.5}  # 0.5 * 2 + 0.5 * 5: an EMA step, no restart
    frozen = make_teacher("stable_ema", tiny_model, base=base, gamma=0.25, ema_rate=0.0)
    frozen.update()
    assert _teacher_values(frozen) == {2.0}  # rate 0: frozen after the mix
    assert set(teacher.state_dict()) == {"teacher", "teacher_schedule"}
