"""Every bad input: one line on stderr naming the problem, exit code 2, no traceback.

The commands run in this process (the `cli` fixture: the real typer app, no torch import per call); the
one real `python -m cptlab.cli` process is test_reliability.py's resume refusal, in the slow tier."""

import pytest
import torch

from helpers import assert_one_line_error


@pytest.mark.parametrize("args, needles", [
    (["run", "nosuchpreset"], ["preset", "nosuchpreset", "expected"]),
    (["run", "smoke", "model.hidden_sise=3"], ["model.hidden_sise", "known key"]),
    (["run", "smoke", "rollout.group_size=many"], ["rollout.group_size", "many"]),
    (["run", "smoke", "eval.domains=[astrology]"], ["eval.domains[0]", "astrology"]),
    (["run", "smoke", "method.sdpo.ema_rate=2"], ["method.sdpo.ema_rate", "[0, 1]"]),
    (["run", "smoke", "rollout.group_size=1"], ["rollout.group_size", ">= 2"]),
    (["run", "smoke", "method.grpo.loss_type=ppo"], ["method.grpo.loss_type", "registered policy loss", "cispo"]),
    (["eval", "/nonexistent/model"], ["/nonexistent/model", "not a directory"]),
    (["study", "ood", "--variants", "grpo,nope"], ["--variants", "nope", "grpo, sdpo"]),
    (["study", "ood", "--launcher", "ray"], ["--launcher", "ray", "local, submitit"]),
    (["study", "ood", "--launcher", "submitit", "--time-min", "0"], ["study.slurm.time_min", "--time-min", ">= 1"]),
])
def test_bad_input_exit_2(args, needles, tmp_path, cli):
    result = cli(*args, "--out", tmp_path / "r") if args[0] == "run" else cli(*args)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "r").exists()


def test_pickle_only_model_dir(tmp_path, tiny_model, tokenizer, cli):
    from cptlab.models import save_model

    d = tmp_path / "m"
    save_model(tiny_model, tokenizer, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), d / "pytorch_model.bin")
    assert_one_line_error(cli("run", "smoke", f"model.path={d}", "--out", tmp_path / "r"), "pickle")
    assert_one_line_error(cli("eval", d), "pickle")


def test_existing_run_dir_is_refused_and_kept(tmp_path, cli):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: x}\n")
    (run / "metrics.jsonl").write_text('{"event": "run_start"}\n')
    assert_one_line_error(cli("run", "smoke", "--out", run), "already exists", "--resume")
    assert (run / "metrics.jsonl").read_text() == '{"event": "run_start"}\n'


def test_resume_of_a_non_run_dir(tmp_path, cli):
    assert_one_line_error(cli("run", "--resume", tmp_path), "not a run directory")


def test_unwritable_output_dir(tmp_path, cli):
    import os

    if os.geteuid() == 0:  # root ignores permission bits (CI runs as root): a path under a file instead
        f = tmp_path / "afile"
        f.write_text("x")
        result = cli("run", "smoke", "--out", f / "r")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        result = cli("run", "smoke", "--out", ro / "sub" / "r")
        ro.chmod(0o700)
    assert_one_line_error(result, "not writable")


def test_domains_lists_every_domain(cli):
    result = cli("domains")
    assert result.exit_code == 0, result.output
    for name in ("arithmetic", "sorting_ood", "gcd"):
        assert name in result.stdout


def test_config_verb_prints_every_field_with_its_docstring(cli):
    result = cli("config", "smoke", "method.sdpo.divergence=reverse_kl")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "method.sdpo.distillation.divergence = 'reverse_kl'   (default 'jsd')" in out
    assert "KL(student || teacher)" in out  # its docstring, under it
    assert "method.prompts_per_step = 4   (default 16)" in out and "rollout.max_new_tokens = 24" in out
    assert_one_line_error(cli("config", "smoke", "method.sdpo.jsd_alpha=2"), "method.sdpo.jsd_alpha")


# -- "did you mean": the closest known name in the one-line error ----------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["run", "tinny"], ["unknown preset 'tinny'", "did you mean 'tiny'?", "or a .yaml file"]),
    (["run", "smoke", "method.lrr=1e-5"], ["config field 'method.lrr'", "did you mean 'method.lr'?", "known key"]),
    (["run", "smoke", "methd.lr=1e-5"], ["config field 'methd'", "did you mean 'method'?"]),
    (["run", "smoke", "eval.domains=[gdc]"], ["eval.domains[0]", "'gdc'", "did you mean 'gcd'?"]),
    (["run", "smoke", "method.name=grop"], ["method.name", "did you mean 'grpo'?"]),
    (["run", "smoke", "prompt.style=ful"], ["prompt.style", "did you mean 'full'?"]),
    (["run", "smoke", "method.sdpo.ema_rat=0.1"], ["did you mean 'method.sdpo.ema_rate'?"]),  # the flat spelling
    (["runn", "smoke"], ["unknown command 'runn'", "did you mean 'run'?", "presets"]),
    (["preset"], ["unknown command 'preset'", "did you mean 'presets'?"]),
    (["study", "oodd"], ["unknown study 'oodd'", "did you mean 'ood'?"]),
])
def test_a_near_miss_is_one_line_with_the_closest_name(args, needles, tmp_path, cli):
    result = cli(*args, "--out", tmp_path / "r") if args[0] == "run" else cli(*args)
    line = assert_one_line_error(result, *needles)
    assert line.count("did you mean") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, needles", [
    (["run", "smoke", "--outt", "x"], ["No such option: --outt", "--out", "(see cptlab run --help)"]),
    (["compare"], ["Missing argument 'run_dirs'", "(see cptlab compare --help)"]),
    (["export", "r", "--stage", "two"], ["'--stage'", "integer", "(see cptlab export --help)"]),
])
def test_usage_errors_are_one_line_too(args, needles, cli):
    assert_one_line_error(cli(*args), *needles)


def test_a_preset_is_called_a_preset_and_a_far_miss_gets_no_guess(cli):
    line = assert_one_line_error(cli("config", "zzzzzz"), "unknown preset 'zzzzzz'")
    assert "config field" not in line and "did you mean" not in line
    line = assert_one_line_error(cli("config", "smoke", "method.qqqqqq=1"), "method.qqqqqq", "known key")
    assert "did you mean" not in line


def test_closest_picks_the_nearest_name_or_none():
    from cptlab.errors import closest

    assert closest("tinny", ["smoke", "tiny", "single"]) == "tiny"
    assert closest("gdc", ["gcd", "gcd_ood", "arithmetic"]) == "gcd"
    assert closest("GCD", ["gcd", "sorting"]) == "gcd"  # a case slip
    assert closest("lr", ["lr", "name"]) is None  # the name itself is no suggestion
    assert closest("xyz", ["gcd", "sorting"]) is None and closest(3, ["gcd"]) is None


# -- presets, help and listings --------------------------------------------------------------------------

def test_presets_prints_each_preset_with_its_description(cli):
    import yaml
    from importlib import resources

    from cptlab.config import load_source, preset_names

    result = cli("presets")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(preset_names())
    for name, line in zip(preset_names(), lines):
        raw = yaml.safe_load((resources.files("cptlab") / "presets" / f"{name}.yaml").read_text())
        assert isinstance(raw["description"], str) and raw["description"].strip(), name
        assert line.split(None, 1) == [name, raw["description"]], line
        assert len(line) <= 80, line
        assert "description" not in load_source(name)  # not a config key


def test_a_config_file_may_carry_a_description_of_text_only(tmp_path, cli):
    from cptlab.config import load_config

    f = tmp_path / "mine.yaml"
    f.write_text('description: "my sweep"\nextends: smoke\nrun: {name: mine}\n')
    assert load_config(str(f)).run.name == "mine"
    f.write_text("description: {a: 1}\nextends: smoke\n")
    assert_one_line_error(cli("config", f), "description")


def test_run_help_shows_overrides_with_an_example(cli):
    result = cli("run", "--help")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "[PRESET|FILE.yaml] [key.sub=value ...]" in out  # shown literally, not eaten as markup
    assert "cptlab run smoke method.lr=1e-5 eval.num_prompts=64 eval.domains=[gcd,sorting]" in out
    assert "cptlab config PRESET [key=value ...]" in out


def test_domains_and_verifiers_fit_80_columns(cli, monkeypatch):
    from cptlab import ui
    from cptlab.tasks import domain_table
    from cptlab.verifiers import table as verifier_table

    monkeypatch.setattr(ui.console, "_width", 80)
    out = cli("domains").stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for r in domain_table():
        assert any(line.startswith(f"{r['name']} · family {r['family']}") for line in lines), r["name"]
        assert f"solution  {r['solution']}" in out  # whole, not folded into pieces
        assert f"example   {r['example']}" in out
    lines = cli("domains", "--verifiers").stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for r in verifier_table():
        assert any(line.startswith(f"{r['name']} · answer format ") for line in lines), r["name"]


def test_domains_on_a_wide_terminal_is_one_table(cli, monkeypatch):
    from cptlab import ui

    monkeypatch.setattr(ui.console, "_width", 160)
    out = cli("domains").stdout
    assert "┃ name " in out and "gcd_ood" in out and "·" not in out


# -- optional dependencies: checked before any work ------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """The driver replaced by a tripwire: a check that comes too late fails the test."""
    import cptlab.api

    def tripwire(*args, **kwargs):
        raise AssertionError("the run started before the optional dependencies were checked")

    monkeypatch.setattr(cptlab.api, "drive", tripwire)


def test_lora_without_peft_fails_before_any_work(tmp_path, cli, monkeypatch, no_work):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    assert_one_line_error(cli("run", "smoke", "model.lora.rank=4", "--out", tmp_path / "r"),
                          "model.lora.rank = 4", "needs peft", "pip install 'cptlab[lora]'")
    assert not (tmp_path / "r").exists()
    # a resumed LoRA run too, from its own config.yaml
    import yaml

    from cptlab.config import load_config, to_dict

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config("smoke", ["model.lora.rank=4"]))))
    assert_one_line_error(cli("run", "--resume", run), "needs peft", "cptlab[lora]")


def test_gguf_model_without_gguf_fails_before_any_work(tmp_path, cli, monkeypatch, no_work):
    import sys

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert_one_line_error(cli("run", "smoke", f"model.path={f}", "--out", tmp_path / "r"),
                          "m.gguf", "needs gguf", "pip install 'cptlab[gguf]'")
