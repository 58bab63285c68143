"""The Python API: cptlab.run and cptlab.load_run, and the README's example of them, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROMPTS, TINY, make_run, tiny_config

import cptlab
from cptlab.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_load_run_gives_the_hand_built_run_as_tables(tmp_path):
    # make_run: base hits arithmetic 40, sorting 50, arithmetic_ood 60 of 200; each of 8 steps adds 8 hits
    # on the trained domain and takes 3 from the others (arithmetic_ood spared while arithmetic trains)
    results = cptlab.load_run(make_run(tmp_path / "toy"))
    hits = [[40, 50, 60], [104, 26, 60], [80, 90, 36]]
    assert results.domains == ["arithmetic", "sorting", "arithmetic_ood"]
    assert results.stages == [{"stage": 1, "domain": "arithmetic", "method": "grpo", "steps": 8},
                              {"stage": 2, "domain": "sorting", "method": "sdpo", "steps": 8}]
    assert results.accuracy_matrix == [
        {"stage": s, "trained": t, **{d: h / PROMPTS for d, h in zip(results.domains, row)}}
        for s, (t, row) in enumerate(zip(["base", "arithmetic", "sorting"], hits))]
    assert len(results.accuracy) == 9
    assert results.accuracy[4] == {"stage": 1, "trained": "arithmetic", "domain": "sorting",
                                   "accuracy": 26 / PROMPTS}
    forgetting = {r["domain"]: r for r in results.forgetting}
    # max over rows 1..S-1 minus row S (S = 2): R[1] - R[2]; with the base row: max(R[0], R[1]) - R[2]
    assert forgetting["arithmetic"]["forgetting"] == pytest.approx((104 - 80) / PROMPTS)
    assert forgetting["arithmetic_ood"]["forgetting"] == pytest.approx((60 - 36) / PROMPTS)
    assert forgetting["sorting"]["forgetting_incl_base"] == pytest.approx((50 - 90) / PROMPTS)
    assert [(r["stage"], r["param/rel_l2_base"]) for r in results.drift] == [(1, 0.01), (2, 0.02)]
    assert "event" not in results.drift[0]
    # the last samples file of each stage (steps 0, 8, 8): 3 domains x 3 responses each
    assert len(results.samples) == 27
    assert {(r["stage"], r["step"]) for r in results.samples} == {(0, 0), (1, 8), (2, 8)}
    assert results.samples[1] == {"stage": 0, "step": 0, "domain": "arithmetic", "question": "arithmetic question 1 "
                                  "<b>bold</b>", "completion": " <answer>4</answer>", "correct": True, "well_formed": True}
    assert results.summary["mean_forgetting"] == pytest.approx((104 - 80) / PROMPTS)
    assert len(results.records) == len((tmp_path / "toy" / "metrics.jsonl").read_text().splitlines())


def test_load_run_of_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(cptlab.errors.UserError, match="no metrics.jsonl"):
        cptlab.load_run(tmp_path)


def test_run_applies_overrides_to_a_preset_or_a_config(tmp_path, monkeypatch):
    import cptlab.api

    seen = []
    monkeypatch.setattr(cptlab.api, "run_continual", lambda cfg=None, **kw: seen.append((cfg, kw)) or Path("x"))
    assert cptlab.run("smoke", out_dir=tmp_path / "a", overrides=["method.lr=0.002"]) == Path("x")
    cfg, kw = seen[-1]
    assert cfg.method.lr == 0.002 and cfg.run.name == "smoke" and kw == {"out_dir": str(tmp_path / "a"),
                                                                          "overwrite": False}
    cptlab.run(tiny_config(), overrides=["run.name=named", "stages=[{domain: arithmetic, steps: 1}]"])
    cfg, kw = seen[-1]
    assert cfg.run.name == "named" and [(s.domain, s.steps) for s in cfg.stages] == [("arithmetic", 1)]
    assert cfg.eval.num_prompts == 2  # the Config's own values stay (helpers.TINY)
    cptlab.run(resume=tmp_path / "a")
    assert seen[-1] == (None, {"resume": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match="method.lr"):
        cptlab.run(tiny_config(), overrides=["method.lr=-1"])
    with pytest.raises(cptlab.errors.UserError, match="resume"):
        cptlab.run("smoke", resume=tmp_path / "a")
    assert len(seen) == 3


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, executed as written in a temp directory, on the smoke preset shrunk
    to seconds (TINY), with drift and samples kept so that every line of it has something to read."""
    import cptlab.config

    original = cptlab.config.load_config
    monkeypatch.setattr(cptlab.config, "load_config", lambda preset, overrides: original(
        preset, [*overrides, *TINY, "eval.drift=true", "eval.save_samples=2"]))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    results = namespace["results"]
    assert Path(namespace["run_dir"]).resolve().parent.parent == tmp_path.resolve()
    assert [row["stage"] for row in results.accuracy_matrix] == [0, 1, 2]
    assert [row["stage"] for row in results.drift] == [0, 1, 2]
    assert results.samples and results.samples[0]["stage"] == 0


@pytest.mark.slow
def test_import_cptlab_stays_cheap():
    """`import cptlab` does not import torch; the API is loaded on first use."""
    code = "import sys, cptlab; assert 'torch' not in sys.modules; cptlab.load_run; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
