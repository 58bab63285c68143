"""Answer formats: the boxed parser, lenient reading, the format registry, and what evaluation reports."""

import pytest
import torch

from cptlab.rollout import SamplingSpec
from cptlab.config import ConfigError, EvalConfig, PromptConfig, load_config, resolve_eval
from cptlab.tasks import all_domain_names, make_split, verify
from cptlab.tasks.answer import RUN_FORMATS, format_answer, get_format, parse_answer
from cptlab.teacher import _demo_text

B = "\\boxed"


@pytest.mark.parametrize("text, answer, well_formed", [
    (f"{B}{{\\frac{{1}}{{2}}}}", "\\frac{1}{2}", True),          # nested braces stay inside the box
    (f"so {B}{{ {{1, 2}} }}", "{1, 2}", True),
    (f"$ {B}{{5}} $.", "5", True),                                # closing math and a full stop may follow
    (f"\\[{B}{{5}}\\]", "5", True),
    (f"{B}{{3}} no, {B}{{4}}", "4", False),                        # the last box counts; two are malformed
    (f"The answer is {B}{{ANSWER}}", None, False),                 # a copied placeholder is no answer
    (f"{B}{{...}}", None, False),
    (f"{B}{{}}", None, False),                                     # empty
    (f"{B}{{5}} because 2 + 3 = 5", "5", False),                   # right box, text after it
    (f"{B}{{5", None, False),                                      # never closed
    (f"{B} {{7}}", "7", True),
    (f"{B}{{{B}{{4}}}}", "4", False),                              # a box in a box: read 4, two wrappers
    ("the answer is 5", None, False),
])
def test_boxed_parsing(text, answer, well_formed):
    parsed = parse_answer(text, "boxed")
    assert parsed.answer == answer
    assert parsed.well_formed is well_formed


def test_boxed_artifact_flags():
    two = parse_answer(f"{B}{{3}} or {B}{{4}}", "boxed")
    assert two.wrappers == 2 and not two.trailing_text
    ph = parse_answer(f"{B}{{ANSWER}}", "boxed")
    assert ph.placeholder and not ph.empty and ph.answer is None
    assert parse_answer(f"{B}{{ }}", "boxed").empty
    assert parse_answer(f"{B}{{4}} ok", "boxed").trailing_text
    assert parse_answer(f"x {B}{{4", "boxed").unclosed
    assert parse_answer(f"<answer>4</answer>", "boxed").answer is None  # formats do not read each other


def test_a_nested_box_is_scored_on_its_content_and_counted_as_an_artifact():
    """\\boxed{\\boxed{4}} is read like \\boxed{4} \\boxed{4}: the answer 4 is scored, the two wrappers make it
    malformed and count as multiple answers in the artifact rates; nested tags the same way."""
    from cptlab.analysis.artifacts import artifact_stats

    nested = parse_answer(f"{B}{{{B}{{4}}}}", "boxed")
    assert (nested.answer, nested.wrappers, nested.well_formed) == ("4", 2, False)
    assert parse_answer(f"{B}{{x = {B}{{{B}{{5}}}}}}.", "boxed").wrappers == 3
    ex = make_split("gcd", "eval", 1, style="full", answer_format="boxed")[0]
    v = verify(ex, f"{B}{{{B}{{{ex.answer}}}}}", "full")
    assert (v.correct, v.well_formed) == (True, False)
    stats = artifact_stats([f"{B}{{{B}{{4}}}}", f"{B}{{4}}"], answer_format="boxed")
    assert (stats["multiple_answer_rate"], stats["malformed_rate"], stats["no_answer_rate"]) == (0.5, 0.5, 0.0)
    tags = parse_answer("<answer><answer>3</answer></answer>")
    assert (tags.answer, tags.wrappers, tags.well_formed) == ("3", 2, False)


def test_tags_keep_their_rules():
    assert parse_answer("x <answer> 12 </answer>").answer == "12"
    assert not parse_answer("<answer><answer>3</answer></answer>").well_formed  # nested tags are two
    assert parse_answer("<answer>ANSWER</answer>").placeholder


@pytest.mark.parametrize("name", sorted(RUN_FORMATS))
def test_every_format_round_trips_and_its_example_is_well_formed(name):
    fmt = get_format(name)
    for value in ("7", "-3", "a b c", "\\frac{1}{2}" if name == "boxed" else "1 2"):
        parsed = fmt.parse(" 1+6=7 " + fmt.render(value))
        assert parsed.answer == value and parsed.well_formed
    example = fmt.parse(fmt.example_answer)
    assert example.well_formed and example.answer == "7"
    for domain in all_domain_names():  # the example's question is asked by no domain
        assert not any(fmt.example_question in ex.question for ex in make_split(domain, "eval", 64, style="full"))
    with pytest.raises(KeyError, match="tags, boxed"):
        get_format("xml")


def test_format_example_is_a_prior_exchange_in_either_layout():
    from cptlab.models import build_tokenizer
    from cptlab.prompts import student_prompt, teacher_prompt

    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    p = PromptConfig(style="full", answer_format="boxed", format_example=True, use_chat_template=True,
                     answer_prefix="")
    assert student_prompt(p, "What is 6 * 7?", tok) == (
        "<user>Q: How many days are in a week?\nPut your final answer within \\boxed{}.\n\n"
        "<assistant>A week has 7 days, so the answer is \\boxed{7}.\n<user>Q: What is 6 * 7?\n\n<assistant>")
    plain = PromptConfig(style="full", format_example=True)
    assert student_prompt(plain, "What is 6 * 7?") == (
        "Q: How many days are in a week?\nGive your final answer inside <answer></answer>.\n"
        "A: A week has 7 days. <answer>7</answer>\nQ: What is 6 * 7?\nA:")
    assert teacher_prompt(plain, "q", " d", None).startswith("Q: How many days are in a week?")
    assert student_prompt(PromptConfig(style="full"), "q") == "Q: q\nA:"
    with pytest.raises(ConfigError, match="prompt.format_example"):
        load_config("smoke", ["prompt.format_example=true"])  # compact prompts have no instruction to show


@pytest.mark.parametrize("fmt", sorted(RUN_FORMATS))
@pytest.mark.parametrize("name", [n for n in all_domain_names() if not n.endswith("_ood")])
def test_reference_solutions_verify_in_every_format(name, fmt):
    for style in ("compact", "full"):
        for ex in make_split(name, "eval", 4, style=style, answer_format=fmt):
            assert ex.answer_format == fmt and format_answer(ex.answer, fmt) in ex.solution()
            v = verify(ex, ex.solution(), style)
            assert v.correct and v.lenient_correct and v.well_formed and v.reward == 1.0, (ex, v)
            if style == "full":
                assert get_format(fmt).instruction in ex.question


def test_lenient_counts_the_right_value_without_the_right_wrapper():
    ex = make_split("gcd", "eval", 1, style="full", answer_format="boxed")[0]
    right, wrong = ex.answer, str(int(ex.answer) + 1)
    cases = {  # completion -> (correct, lenient_correct, well_formed)
        f"{B}{{{right}}}": (True, True, True),
        f"{B}{{{right}}} since it divides both": (True, True, False),   # strict and rewarded, not well formed
        f"The GCD is {right}.": (False, True, False),                    # no box: the last number
        f"{B}{{GCD = {right}}}": (False, True, True),                    # junk in the box: its last number
        f"{B}{{ANSWER}} and it is {right}": (False, True, False),         # placeholder box: the text's last number
        f"{B}{{{wrong}}} though {right}": (False, False, False),          # a real wrong box is the answer
        f"It is {right}, no {wrong}": (False, False, False),
    }
    for text, (correct, lenient, formed) in cases.items():
        v = verify(ex, text, "full")
        assert (v.correct, v.lenient_correct, v.well_formed) == (correct, lenient, formed), text
        assert v.reward == (1.0 if correct else 0.0)  # the reward stays strict
    assert "placeholder" in verify(ex, f"{B}{{ANSWER}}", "full").feedback


def test_lenient_reads_compact_answers_too():
    ex = make_split("sorting", "eval", 1)[0]  # tags, compact: the last line is the list
    v = verify(ex, f"\n{ex.answer}")
    assert not v.correct and v.lenient_correct and v.lenient_answer == ex.answer


def test_answer_only_demonstration_uses_the_runs_format():
    ex = make_split("gcd", "eval", 1, style="full", answer_format="boxed")[0]
    v = verify(ex, f"I think {B}{{{ex.answer}}}", "full")
    assert _demo_text("whatever", v, "answer_only") == f" {B}{{{ex.answer}}}"
    assert ex.solution("answer_only") == f" {B}{{{ex.answer}}}"


def test_answer_format_is_validated():
    with pytest.raises(ConfigError, match="prompt.answer_format.*'tags', 'boxed'"):
        load_config("smoke", ["prompt.answer_format=xml"])


def test_eval_budget_and_temperature_follow_the_rollout_unless_set():
    cfg = load_config("smoke", ["rollout.max_new_tokens=17", "rollout.temperature=0.7", "eval.max_new_tokens=null",
                                "eval.temperature=null", "eval.save_samples=null"])
    e = resolve_eval(cfg)
    assert (e.max_new_tokens, e.temperature, e.save_samples) == (17, 0.7, 4)
    cfg = load_config("smoke", ["eval.max_new_tokens=5", "eval.temperature=0.5", "model.path=/some/model",
                                "eval.save_samples=null"])
    e = resolve_eval(cfg)
    assert (e.max_new_tokens, e.temperature, e.save_samples) == (5, 0.5, 32)
    assert EvalConfig().max_new_tokens is None  # the default follows the rollout


def test_evaluation_reports_strict_lenient_and_format_rates(monkeypatch, tiny_model, tokenizer):
    import cptlab.evaluate as E

    examples = make_split("gcd", "eval", 4, style="full", answer_format="boxed")
    texts = [f"{B}{{{examples[0].answer}}}",        # correct, well formed
             f"so it is {examples[1].answer}",      # lenient only
             f"{B}{{ANSWER}}",                       # placeholder
             f"{B}{{{examples[3].answer}}} ok"]      # correct, text after the box

    class Fake:
        def __init__(self, texts):
            self.texts, self.lengths = texts, torch.tensor([float(len(t)) for t in texts])

    seen = {}

    def fake_generate(model, tok, prompts, spec, **kw):
        seen["max_new_tokens"] = spec.max_new_tokens
        return Fake(texts)

    monkeypatch.setattr(E, "generate", fake_generate)
    cfg = load_config("smoke", ["prompt.style=full", "prompt.answer_format=boxed", "eval.num_prompts=4",
                                "eval.num_samples=0", "rollout.max_new_tokens=9", "eval.max_new_tokens=null"])
    ecfg = resolve_eval(cfg)
    r = E.evaluate_domain(tiny_model, tokenizer, "gcd", ecfg, cfg.prompt, SamplingSpec.for_eval(ecfg, cfg.rollout))
    assert seen["max_new_tokens"] == 9
    m = r.metrics()
    assert (m["greedy_acc"], m["lenient_acc"], m["format_rate"], m["num_prompts"]) == (0.5, 0.75, 0.25, 4)
    assert [row["lenient_correct"] for row in r.rows] == [True, True, False, True]
    assert r.rows[2]["answer"] is None and r.rows[1]["lenient_answer"] == examples[1].answer
    assert len(r.samples) == 2  # the smoke preset saves 2
    with pytest.raises(ValueError, match="resolve_eval"):
        E.evaluate_domain(tiny_model, tokenizer, "gcd", EvalConfig(), cfg.prompt,
                          SamplingSpec.for_eval(ecfg, cfg.rollout))


def test_show_prints_model_text_literally():
    from cptlab.ui import console, print_samples

    row = dict(prompt="Q: [bold]hi[/bold]\n", completion="<b>x</b> [red]y[/red] \x1b[31mred :smile:",
               answer="[i]5[/i]", lenient_answer=None, correct=False, lenient_correct=True, well_formed=False)
    with console.capture() as cap:
        print_samples("gcd", [row, row], 1)
    out = cap.get()
    assert "[bold]hi[/bold]" in out and "<b>x</b> [red]y[/red]" in out and ":smile:" in out
    assert "\\x1b[31mred" in out and "\x1b" not in out  # the escape is spelled out, never sent
    assert "'[i]5[/i]'" in out and "wrong (malformed); lenient: right" in out
    assert out.count("completion:") == 1  # one sample asked for


def test_eval_command_shows_samples_with_the_rollout_budget(tmp_path, tiny_model, tokenizer, cli):
    import json

    from cptlab.models import save_model

    save_model(tiny_model, tokenizer, tmp_path / "m")
    out = tmp_path / "e.json"
    result = cli("eval", tmp_path / "m", "--domains", "gcd,sorting", "--show", "2", "--out", out,
                 "rollout.max_new_tokens=3", "eval.num_prompts=3", "eval.num_samples=0")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("completion:") == 4 and result.stdout.count("verdict:") == 4
    data = json.loads(out.read_text())
    for name in ("gcd", "sorting"):
        assert data["results"][name]["mean_length"] <= 3  # eval.max_new_tokens unset: the rollout's 3
        assert data["results"][name]["num_prompts"] == 3 and len(data["samples"][name]) == 2
        assert data["samples"][name][0]["prompt"].startswith("Q: ")


@pytest.mark.slow
def test_calibrate_base_script_writes_a_cell_per_domain_and_variant(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    candidates = tmp_path / "c.yaml"
    candidates.write_text("domains:\n  p: {task: products, config: {min_digits: 1, max_digits: 1}, eval_pool: 40}\n")
    script = Path(__file__).parents[1] / "benchmarks" / "calibrate_base.py"
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, str(script), "smoke", "warmup.steps=2", "--domains-file", str(candidates),
                           "--domains", "p,gcd", "--n", "3", "--max-new-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    cells = {(c["domain"], c["variant"]): c for c in data["cells"]}
    assert set(cells) == {(d, v) for d in ("p", "gcd") for v in ("boxed", "boxed_example")}
    for c in cells.values():
        assert c["num_prompts"] == 3 and 0 <= c["greedy_acc"] <= c["lenient_acc"] <= 1 and c["mean_length"] <= 4
        assert "\\boxed{}" in c["samples"][0]["question"]
    assert data["domains"]["p"]["eval_pool"] == 40 and "boxed_example" in proc.stdout
