"""Data-set domains: every table layout reads to the same items, the split is deterministic, disjoint and
independent of row order, duplicates are dropped, bad data is one line naming the field and the row, and
a data-set domain trains, evaluates and shows samples like a generator domain."""

import csv
import json
import random

import pytest
import yaml

from cptlab.config import ConfigError, load_config
from cptlab.errors import UserError
from cptlab.tasks import domain_info, get_domain, install_domains, make_split, train_pool_size, verify
from helpers import assert_one_line_error

ROWS = [{"problem": f"{a} + {b} / {c}", "solution": f"\\frac{{{a * c + b}}}{{{c}}}", "level": "L3" if a % 2 else "L1"}
        for a in range(1, 9) for b in range(1, 6) for c in (7, 11)]  # 80 distinct questions


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_domain(source, **extra) -> list[str]:
    spec = {"source": str(source), "fields": {"question": "problem", "answer": "solution"}, "verifier": "math", **extra}
    return [f"domains.my_math={json.dumps(spec)}", "eval.domains=[my_math]", "stages=[]"]


def load(overrides, preset="smoke"):
    # stages=[] is refused by validation, so tests that only read domains give one stage on them
    overrides = [o for o in overrides if o != "stages=[]"]
    cfg = load_config(preset, overrides)
    install_domains(cfg.domains)  # as the entry points that run work do
    return cfg


def cfg_file(tmp_path, domains: dict, stages=None, **sections):
    data = {"extends": "smoke", "domains": domains, "eval": {"domains": list(domains), "num_prompts": 8,
                                                               "num_samples": 0, "every": 0},
            "stages": stages or [{"domain": next(iter(domains)), "steps": 1}], **sections}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def split_questions(name="my_math"):
    return ([ex.entry["question_text"] for ex in make_split(name, "eval", 1000)],
            sorted(ex.entry["question_text"] for ex in make_split(name, "train", 1000)))


def test_every_table_layout_reads_the_same_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=16)  # several batches
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:3])}
                         ).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "snap" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "snap" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 3), tmp_path / "snap" / "data" / "test-00000-of-00001.parquet")
    shuffled = list(ROWS)
    random.Random(1).shuffle(shuffled)
    write_jsonl(tmp_path / "shuffled.jsonl", shuffled)

    load(math_domain(tmp_path / "d.jsonl"))
    reference = split_questions()
    evals, trains = reference
    assert len(evals) == 40 and len(trains) == 40 and not set(evals) & set(trains)  # half held out, disjoint
    for source, extra in [("d.json", {}), ("d.csv", {}), ("d.parquet", {}), ("ds", {}), ("dd", {"split": "train"}),
                          ("dd", {}), ("snap", {"split": "train"}), ("shuffled.jsonl", {})]:
        load(math_domain(tmp_path / source, **extra))
        assert split_questions() == reference, source
    load(math_domain(tmp_path / "dd", eval_split="test"))
    assert get_domain("my_math").dataset.info["eval"] == 3 and domain_info("my_math")["overlap"] == 3


def test_split_sizes_duplicates_examples_and_sampling(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS + ROWS[:10] + [{**ROWS[0], "problem": "  " + ROWS[0]["problem"].upper()}])
    load(math_domain(tmp_path / "d.jsonl", eval_pool=16))
    info = domain_info("my_math")
    assert info == {"kind": "dataset", "verifier": "math", "answer_format": None, "train": 64, "eval": 16,
                    "rows": 91, "duplicates": 11, "skipped": 0, "overlap": 0, "filtered": 0}
    assert train_pool_size("my_math", 2048) == 64 and train_pool_size("gcd", 2048) == 2048
    ex = make_split("my_math", "eval", 1, answer_format="boxed")[0]
    assert ex.question == ex.entry["question_text"] + "\nPut your final answer within \\boxed{}."
    assert ex.solution() == " \\boxed{" + ex.answer + "}" and verify(ex, ex.solution()).correct
    a, b = make_split("my_math", "train", 8, seed=1), make_split("my_math", "train", 8, seed=1)
    assert [x.question for x in a] == [x.question for x in b]
    assert [x.question for x in make_split("my_math", "train", 8, seed=2)] != [x.question for x in a]
    assert len(make_split("my_math", "train", 1000)) == 64 and len(make_split("my_math", "eval", 1000)) == 16


def test_filter_extract_column_lists_nested_paths_and_chat_prompts(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": f"Solve.\n\nWhat is {i} + {i}?\n\nRemember the box."}],
             "reward_model": {"ground_truth": str(2 * i)}, "meta": {"level": "L3" if i % 2 else "L1"}}
            for i in range(40)]
    write_jsonl(tmp_path / "dapo.jsonl", rows)
    spec = {"source": str(tmp_path / "dapo.jsonl"), "verifier": "numeric", "eval_pool": 5,
            "fields": {"question": "prompt", "answer": "reward_model.ground_truth"},
            "filter": {"meta.level": "L3"}, "extract": {"question": r"(?s)\n\n(.*)\n\nRemember"}}
    load([f"domains.dapo={json.dumps(spec)}", "eval.domains=[dapo]"])
    assert domain_info("dapo")["filtered"] == 20
    ex = make_split("dapo", "eval", 1)[0]
    n = int(ex.entry["question_text"].split()[2])
    assert ex.entry["question_text"] == f"What is {n} + {n}?" and ex.answer == str(2 * n) and n % 2 == 1

    gpqa = [{"Question": f"Which is {k}?", "Correct Answer": f"right {k}", "Incorrect Answer 1": f"w1 {k}",
             "Incorrect Answer 2": f"w2 {k}", "Incorrect Answer 3": f"w3 {k}"} for k in range(30)]
    write_jsonl(tmp_path / "gpqa.jsonl", gpqa)
    spec = {"eval_source": str(tmp_path / "gpqa.jsonl"), "verifier": "choice", "shuffle_choices": True,
            "fields": {"question": "Question", "answer": "Correct Answer",
                       "choices": ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]}}
    load([f"domains.gpqa={json.dumps(spec)}", "eval.domains=[gpqa]"])
    examples = make_split("gpqa", "eval", 30)
    letters = [ex.answer for ex in examples]
    assert len(set(letters)) > 1  # the correct answer is not always A
    for ex in examples:
        assert ex.entry["choices"]["ABCD".index(ex.answer)].startswith("right")
        assert "\nA. " in ex.question and verify(ex, f"<answer>{ex.answer}</answer>").correct
    with pytest.raises(UserError, match="has no training rows"):
        make_split("gpqa", "train", 4)


@pytest.mark.parametrize("change, needles", [
    ({"source": "missing.jsonl"}, ["domains.my_math.source", "an existing file"]),
    ({"fields": {"question": "problem", "answer": "sol"}}, ["domains.my_math.source", "column 'sol'", "problem"]),
    ({"verifier": "maths"}, ["domains.my_math.verifier", "one of exact"]),
    ({"verifier": "python:no_such_mod_q:f"}, ["domains.my_math.verifier", "does not import"]),
    ({"verifier_options": {"tolerance": 1}}, ["domains.my_math.verifier_options.tolerance", "reveal"]),
    ({"filter": {"level": "L9"}}, ["domains.my_math.source", "at least one usable row"]),
    ({"eval_source": "SAME"}, ["domains.my_math.eval_source", "another table"]),
    ({"source": "bad.jsonl"}, ["domains.my_math.source", "line 3 is not valid JSON"]),
    ({"eval_pool": 80}, ["domains.my_math.eval_pool", "from 1 to 79"]),
    ({"fields": {"question": "problem", "answer": "level", "choices": "problem"}, "verifier": "choice"},
     ["domains.my_math.source", "row 1", "expected 2 to 26 options, got 1"]),
    ({"task": "gcd"}, ["domains.my_math.task", "empty for a data-set domain"]),
])
def test_bad_data_is_one_config_error(tmp_path, change, needles):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n{oops\n")
    spec = {"source": str(tmp_path / "d.jsonl"), "fields": {"question": "problem", "answer": "solution"},
            "verifier": "math", **change}
    for key in ("source", "eval_source"):
        if spec.get(key) == "SAME":
            spec[key] = spec["source"]
        elif key in change and not str(spec[key]).startswith("/"):
            spec[key] = str(tmp_path / spec[key])
    with pytest.raises(ConfigError) as e:
        load([f"domains.my_math={json.dumps(spec)}", "eval.domains=[my_math]"])
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_bad_rows_skip_counts_them_and_generator_keys_need_a_source(tmp_path):
    rows = ROWS + [{"problem": "", "solution": "1", "level": "L1"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    load(math_domain(tmp_path / "d.jsonl", bad_rows="skip"))
    assert domain_info("my_math")["skipped"] == 1
    with pytest.raises(ConfigError, match="domains.my_math.source.*row 81.*question is empty"):
        load(math_domain(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="domains.g.verifier.*unless the domain is a data set"):
        load(["domains.g.task=gcd", "domains.g.verifier=math"])


def test_relative_sources_are_recorded_absolute(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    cfg = load(math_domain("d.jsonl"))
    assert cfg.domains["my_math"].source == str(tmp_path / "d.jsonl")


def test_cli_refuses_bad_data_in_one_line_and_writes_nothing(tmp_path, cli, monkeypatch):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    path = cfg_file(tmp_path, {"my_math": {"source": "bad.jsonl", "verifier": "math",
                                           "fields": {"question": "problem", "answer": "solution"}}})
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("run", path), "domains.my_math.source", "line 2 is not valid JSON")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_jsonl_math_domain_trains_evaluates_and_shows_samples(tmp_path, cli, monkeypatch):
    write_jsonl(tmp_path / "math.jsonl", ROWS)
    domains = {"my_math": {"source": "math.jsonl", "verifier": "math", "template": "{problem} =",
                           "fields": {"question": "problem", "answer": "solution"}}}
    path = cfg_file(tmp_path, domains, stages=[{"domain": "my_math", "steps": 2},
                                              {"domain": "my_math", "steps": 1, "method": {"name": "sdpo"}}],
                    warmup={"domains": ["arithmetic", "my_math"], "examples_per_domain": 100, "steps": 10,
                            "cache_dir": ""}, rollout={"group_size": 2, "max_new_tokens": 16},
                    run={"name": "ds", "checkpoint_every": 0})
    monkeypatch.chdir(tmp_path)
    result = cli("run", path)
    assert result.exit_code == 0, result.output[-2000:]
    run = tmp_path / "runs" / "ds"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "run_start")
    assert start["domain_info"]["my_math"]["verifier"] == "math" and start["domain_info"]["my_math"]["eval"] == 40
    assert len([r for r in records if r["event"] == "train"]) == 3
    evals = [r for r in records if r["event"] == "eval" and r["domain"] == "my_math"]
    assert len(evals) == 3 and all(r["num_prompts"] == 8 and r["verifier_errors"] == 0 for r in evals)
    samples = json.loads(sorted((run / "samples").glob("stage2-*.json"))[-1].read_text())["my_math"]
    assert all("feedback" in s and "reward" in s for s in samples)
    assert all(s["feedback"] for s in samples if not s["correct"])
    report = (run / "report.html").read_text()
    assert "Data-set domains" in report and "verifier feedback" in report
    shown = cli("eval", run / "base", "--config", path, "--domains", "my_math", "--show", "2")
    assert shown.exit_code == 0, shown.output[-2000:]
    assert shown.stdout.count("my_math sample") == 2 and "reward:" in shown.stdout
    assert "feedback:" in shown.stdout or shown.stdout.count("correct (") == 2


DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")


def write_paper_data(root):
    """A few rows of each data set of the `paper` preset, in the layouts and schemas it documents."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")

    def parquet(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)

    d = root / "data" / "paper"
    parquet(d / "DAPO-Math-17k" / "data" / "dapo-math-17k.parquet", [
        {"data_source": "math_dapo", "prompt": [{"content": DAPO.format(f"What is ${k}^2$?"), "role": "user"}],
         "ability": "MATH", "reward_model": {"ground_truth": str(k * k), "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": f"id-{k}"}} for k in range(2, 14)])
    parquet(d / "SciKnowEval" / "data" / "test-00000-of-00001.parquet", [
        {"question": f"Which element has atomic number {z}?", "choices": {"text": ["H", "He", "Li", "Be"],
                                                                          "label": ["A", "B", "C", "D"]},
         "answerKey": "ABCD"[z - 1], "type": "mcq-4-choices", "domain": "Chemistry" if z < 4 else "Physics",
         "details": {"level": "L3", "task": "t", "subtask": "s"}} for z in range(1, 5)]
        + [{"question": f"L2 question {k}?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A",
            "type": "mcq-2-choices", "domain": "Chemistry", "details": {"level": "L2", "task": "t", "subtask": "s"}}
           for k in range(3)])
    (d / "tooluse").mkdir(parents=True)
    for name, ks in (("train.json", range(6)), ("test.json", range(6, 9))):
        (d / "tooluse" / name).write_text("".join(json.dumps({
            "prompt": f"Your task is to answer the user's question using available tools.\nName: Axolotl\n"
                      f"Question: show me {k} axolotls", "description": "...", "idx": k, "dataset": "tooluse",
            "system": None, "tests": None, "kind": "tooluse", "elo": 1500,
            "answer": json.dumps([{"Action": "searchAxolotlImages", "Action_Input": json.dumps({"page": k})}])}) + "\n"
            for k in ks))
    parquet(d / "Dolci-Think-RL-7B" / "data" / "train-00000-of-00001.parquet", [
        {"id": f"c{k}", "prompt": f"Write add{k}(x) returning x + {k}.", "dataset": ["code"],
         "ground_truth": [f"assert add{k}(1) == {1 + k}", f"assert add{k}(-{k}) == 0"]} for k in range(5)])
    parquet(d / "math500" / "test-00000-of-00001.parquet",
            [{"problem": f"Simplify $\\frac{{{2 * k}}}{{{4 * k}}}$.", "answer": "\\frac{1}{2}", "solution": "...",
              "subject": "Algebra", "level": 1, "unique_id": f"u{k}"} for k in range(1, 4)])
    with open(d / "gpqa_diamond.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                          "Incorrect Answer 3", "Record ID"])
        w.writeheader()
        for k in range(4):
            w.writerow({"Question": f"Which gas is inert ({k})?", "Correct Answer": f"argon {k}",
                        "Incorrect Answer 1": f"oxygen {k}", "Incorrect Answer 2": f"fluorine {k}",
                        "Incorrect Answer 3": f"chlorine {k}", "Record ID": f"r{k}"})
    (d / "bfcl_multiple.jsonl").write_text("".join(json.dumps({
        "id": f"multiple_{k}", "question": [[{"role": "user", "content": f"Area of a triangle with base {k} cm?"}]],
        "function": [{"name": "area", "description": "triangle area", "parameters": {
            "type": "dict", "properties": {"base": {"type": "integer"}, "unit": {"type": "string"}},
            "required": ["base"]}}, {"name": "perimeter", "description": "p", "parameters": {}}],
        "ground_truth": [{"area": {"base": [k], "unit": ["", "cm"]}}]}) + "\n" for k in range(1, 4)))
    tests = {"inputs": ["3\n4\n", "1\n1\n"], "outputs": ["7", "2"], "testtype": "stdin", "fn_name": "", "time_limit": 6}
    parquet(d / "livecodebench" / "test.parquet", [
        {"data_source": "livecodebench", "prompt": [{"role": "user", "content": f"Read two numbers, print their sum ({k})."}],
         "ability": "code", "reward_model": {"style": "code", "ground_truth": json.dumps(tests)},
         "extra_info": {"split": "test", "index": str(k)}} for k in range(3)])
    datasets.Dataset.from_list([
        {"question": f"What is {k} + {k}?", "choices": [str(2 * k), str(2 * k + 1), "0", "-1"], "answer": 0,
         "error_type": "ok" if k else "wrong_groundtruth"} for k in range(4)]).save_to_disk(str(d / "mmlu-redux"))


def test_the_paper_preset_reads_the_studys_schemas(tmp_path, monkeypatch):
    write_paper_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load(["domains.math.eval_pool=4", "domains.science.eval_pool=1", "domains.code.eval_pool=2"], "paper")
    assert cfg.domains["math"].source == str(tmp_path / "data" / "paper" / "DAPO-Math-17k")
    sizes = {name: (domain_info(name).get("train"), domain_info(name)["eval"]) for name in cfg.eval.domains}
    assert sizes == {"math": (8, 4), "science": (2, 1), "tooluse": (6, 3), "code": (3, 2), "math500": (0, 3),
                     "gpqa": (0, 4), "bfcl": (0, 3), "livecodebench": (0, 3), "mmlu_redux": (0, 3)}
    assert domain_info("science")["filtered"] == 4 and domain_info("mmlu_redux")["filtered"] == 1

    def first(name):
        return make_split(name, "eval", 1, style="full", answer_format="boxed")[0]

    math = first("math")
    assert math.entry["question_text"].startswith("What is $") and "Answer:" not in math.question
    assert verify(math, f"\\boxed{{{math.answer}}}").correct
    wrong = verify(math, "\\boxed{-1}")
    assert not wrong.correct and wrong.feedback == "answer -1 is wrong"  # reveal: false, as the study's scorer
    for name in ("science", "gpqa", "mmlu_redux"):
        ex = first(name)
        assert verify(ex, f"\\boxed{{{ex.answer}}}").correct and "\nB. " in ex.question, name
    tool = first("tooluse")
    assert tool.answer_format == "react" and tool.solution().strip().startswith("Action: searchAxolotlImages")
    assert verify(tool, tool.solution()).correct
    assert verify(tool, 'Action: searchAxolotlImages\nAction Input: {"page": 99}').feedback.startswith(
        "argument `page`: expected")
    bfcl = first("bfcl")
    assert bfcl.answer_format == "tool_call" and bfcl.entry["question_text"].startswith("Tools: [")
    k = int(bfcl.entry["question_text"].split("base ")[1].split()[0])
    assert verify(bfcl, f'<tool_call>{{"name": "area", "arguments": {{"base": {k}}}}}</tool_call>').correct
    code = first("code")
    k = int(code.entry["question_text"].split("x + ")[1].rstrip("."))
    assert verify(code, f"```python\ndef add{k}(x):\n    return x + {k}\n```").correct
    failed = verify(code, f"```python\ndef add{k}(x):\n    return x\n```")
    assert not failed.correct and f"assert add{k}(1) == {1 + k}" in failed.feedback
    lcb = first("livecodebench")
    assert verify(lcb, "```python\na = int(input())\nb = int(input())\nprint(a + b)\n```").correct
    assert "expected output '7', got '12'" in verify(lcb, "```python\nprint(int(input()) * int(input()))\n```").feedback


def test_an_eval_only_domain_is_refused_as_a_stage_or_warm_up_domain(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = {"eval_source": str(tmp_path / "d.jsonl"), "fields": {"question": "problem", "answer": "solution"},
            "verifier": "math"}
    with pytest.raises(ConfigError, match=r"stages\[0\].domain.*training rows"):
        load([f"domains.held={json.dumps(spec)}", "eval.domains=[held]", "stages=[{domain: held, steps: 2}]"])
    with pytest.raises(ConfigError, match=r"warmup.domains\[1\].*training rows"):
        load([f"domains.held={json.dumps(spec)}", "warmup.domains=[arithmetic, held]"])
