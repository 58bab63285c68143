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
