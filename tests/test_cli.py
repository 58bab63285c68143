"""Every bad input: one line on stderr naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch


def cptlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cptlab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


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
])
def test_bad_input_exit_2(args, needles, tmp_path):
    assert_one_line_error(cptlab(*args, "--out", str(tmp_path / "r")) if args[0] == "run" else cptlab(*args),
                          *needles)


def test_pickle_only_model_dir(tmp_path, tiny_model, tokenizer):
    from cptlab.models import save_model

    d = tmp_path / "m"
    save_model(tiny_model, tokenizer, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), d / "pytorch_model.bin")
    assert_one_line_error(cptlab("run", "smoke", f"model.path={d}", "--out", str(tmp_path / "r")), "pickle")
    assert_one_line_error(cptlab("eval", str(d)), "pickle")


def test_existing_run_dir_is_refused_and_kept(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: x}\n")
    (run / "metrics.jsonl").write_text('{"event": "run_start"}\n')
    assert_one_line_error(cptlab("run", "smoke", "--out", str(run)), "already exists", "--resume")
    assert (run / "metrics.jsonl").read_text() == '{"event": "run_start"}\n'


def test_resume_of_a_non_run_dir(tmp_path):
    assert_one_line_error(cptlab("run", "--resume", str(tmp_path)), "not a run directory")


def test_unwritable_output_dir(tmp_path):
    import os

    if os.geteuid() == 0:  # root ignores permission bits (CI runs as root): a path under a file instead
        f = tmp_path / "afile"
        f.write_text("x")
        proc = cptlab("run", "smoke", "--out", str(f / "r"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        proc = cptlab("run", "smoke", "--out", str(ro / "sub" / "r"))
        ro.chmod(0o700)
    assert_one_line_error(proc, "not writable")


def test_domains_lists_every_domain():
    proc = cptlab("domains")
    assert proc.returncode == 0
    for name in ("arithmetic", "sorting_ood", "gcd"):
        assert name in proc.stdout


def test_config_verb_prints_every_field_with_its_docstring():
    proc = cptlab("config", "smoke", "method.sdpo.divergence=reverse_kl")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "method.sdpo.divergence = 'reverse_kl'   (default 'jsd')" in out
    assert "KL(student || teacher)" in out  # its docstring, under it
    assert "method.prompts_per_step = 4   (default 16)" in out and "rollout.max_new_tokens = 24" in out
    assert_one_line_error(cptlab("config", "smoke", "method.sdpo.jsd_alpha=2"), "method.sdpo.jsd_alpha")
