"""`cptlab export`: a run's model at a stage's end or a kept step as a plain Hugging Face directory that
transformers loads to the run's logits and `cptlab eval` to the run's recorded accuracies; LoRA runs
merged or as a peft adapter; bad requests are one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cptlab.checkpoint import load_weights
from cptlab.config import load_config
from cptlab.api import run_continual
from cptlab.errors import UserError
from cptlab.export import export_model
from cptlab.lora import apply_lora
from cptlab.models import load_model
from cptlab.store import RunStore, read_jsonl
from helpers import assert_one_line_error, run_until_crash

# the smoke preset: stages of 3 steps, checkpoints every 2 steps, evaluations at steps 2 and 3
SMOKE = ["run.report=false", "run.device=cpu", "run.keep_checkpoints=2"]
IDS = torch.tensor([[5, 9, 13, 17, 21, 25, 30], [6, 10, 14, 18, 22, 26, 31]])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, warmup_cache) -> Path:
    cfg = load_config("smoke", [*SMOKE, f"warmup.cache_dir={warmup_cache}"])
    return run_continual(cfg, out_dir=str(tmp_path_factory.mktemp("full") / "run"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, warmup_cache) -> Path:
    pytest.importorskip("peft")
    cfg = load_config("smoke", [*SMOKE, f"warmup.cache_dir={warmup_cache}", "model.lora.rank=4"])
    return run_continual(cfg, out_dir=str(tmp_path_factory.mktemp("lora") / "run"))


def run_model(run: Path, checkpoint: str):
    """The run's model at a checkpoint as the run held it: its base, LoRA-wrapped as in training, the
    checkpoint's weights loaded (a LoRA model stays unmerged)."""
    cfg = load_config(str(run / "config.yaml"))
    model, _ = load_model(str(run / "base"), cfg.model, torch.device("cpu"))
    model = apply_lora(model, cfg.model.lora, seed=cfg.run.seed)
    load_weights(run / "checkpoints" / checkpoint, model)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


GREEDY = ("greedy_acc", "lenient_acc", "format_rate", "mean_length", "num_prompts")  # of the greedy answers


def recorded(run: Path, stage: int, global_step: int) -> dict[str, dict]:
    """domain -> the greedy metrics the run recorded at that point."""
    return {r["domain"]: {k: r[k] for k in GREEDY} for r in read_jsonl(run / "metrics.jsonl")
            if r.get("event") == "eval" and r["stage"] == stage and r["global_step"] == global_step}


def evaluated(cli, model_dir: Path, run: Path, tmp: Path) -> dict[str, dict]:
    """`cptlab eval MODEL --config RUN/config.yaml`, as the export tells a user to run it (`cli`: the
    fixture, the command in this process)."""
    out = tmp / f"eval-{model_dir.name}.json"
    result = cli("eval", model_dir, "--config", run / "config.yaml", "--out", out)
    assert result.exit_code == 0, result.output[-2000:]
    return {d: {k: r[k] for k in GREEDY} for d, r in json.loads(out.read_text())["results"].items()}


@pytest.mark.slow
def test_every_stage_end_is_kept_and_exports_to_the_runs_logits_and_accuracies(full_run, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    # keep_checkpoints=2 keeps stage2-step2 and stage2-step3; keep_stage_models (auto: on for the tiny model)
    # keeps stage 1's end too; the base's checkpoint goes (RUN/base holds it)
    assert [d.name for d in RunStore.open(full_run).checkpoint_dirs()] == ["stage1-step3", "stage2-step2",
                                                                            "stage2-step3"]
    stage1 = export_model(full_run, tmp_path / "s1", stage=1)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "cptlab_export.json"} <= {f.name for f in stage1.iterdir()}
    assert not list(tmp_path.glob(".s1.*"))  # no temp dir left beside it
    exported = AutoModelForCausalLM.from_pretrained(stage1).eval()
    assert torch.equal(logits(exported), logits(run_model(full_run, "stage1-step3")))
    generation = json.loads((stage1 / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 24  # the run's eval budget
    provenance = json.loads((stage1 / "cptlab_export.json").read_text())
    assert (provenance["stage"], provenance["global_step"]) == (1, 3)
    assert provenance["greedy_acc"] == {d: m["greedy_acc"] for d, m in recorded(full_run, 1, 3).items()}

    # cptlab eval reads the same accuracies the run recorded at that point, on the same held-out prompts
    mid = export_model(full_run, tmp_path / "gs5", step=5)  # stage 2 step 2, a mid-stage checkpoint
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(mid)), logits(run_model(full_run, "stage2-step2")))
    stage0 = export_model(full_run, tmp_path / "stage0", stage=0)
    assert json.loads((stage0 / "cptlab_export.json").read_text())["checkpoint"] == "base"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(stage0)),
                       logits(AutoModelForCausalLM.from_pretrained(full_run / "base")))
    for directory, stage, step in ((stage1, 1, 3), (mid, 2, 5), (stage0, 0, 0)):
        assert evaluated(cli, directory, full_run, tmp_path) == recorded(full_run, stage, step), directory
    # the default is the newest kept model: the last stage's end, which SDPO moved away from the base (the
    # smoke base never answers right, so GRPO's stage 1 had no reward and no gradient)
    newest = export_model(full_run, tmp_path / "newest")
    assert json.loads((newest / "cptlab_export.json").read_text())["checkpoint"] == "stage2-step3"
    base, trained = load_file(str(full_run / "base" / "model.safetensors")), load_file(str(newest / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(newest)), logits(run_model(full_run, "stage2-step3")))
    assert evaluated(cli, newest, full_run, tmp_path) == recorded(full_run, 2, 6) != recorded(full_run, 0, 0)


def auto_greedy(directory: Path, prompts: list[str]) -> list[str]:
    """Each prompt's greedy completion through the Auto classes alone, as a transformers user would get
    it: AutoTokenizer, AutoModelForCausalLM and the export's generation_config (greedy, the run's budget,
    its stop tokens), the completion decoded without special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids)
        out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.slow
def test_an_export_loads_with_the_auto_classes_and_generates_the_runs_answers(full_run, tmp_path, cli):
    """AutoTokenizer picks Qwen2Tokenizer for the tiny qwen2 model; the export's tokenizer reads right under
    it (spaces and newlines kept, the run's own ids), and greedy generation through the Auto classes gives
    the completions the run recorded and those `cptlab eval` gives on the same export."""
    from transformers import AutoTokenizer

    stage1 = tmp_path / "s1"
    result = cli("export", full_run, "--stage", "1", "--out", stage1)
    assert result.exit_code == 0, result.output[-2000:]
    assert f"in Python: AutoTokenizer.from_pretrained({str(stage1)!r}), AutoModelForCausalLM.from_pretrained(" \
           f"{str(stage1)!r})" in result.stdout
    auto = AutoTokenizer.from_pretrained(stage1)
    _, own = load_model(str(full_run / "base"), load_config(str(full_run / "config.yaml")).model, torch.device("cpu"))
    text = "sort asc: 34 0 27\nQ: 4+0\nA:  <answer>3 4</answer>\n\n"
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert auto(text)["input_ids"] == own(text)["input_ids"]
    assert auto.decode(auto(text)["input_ids"]) == text
    assert json.loads((stage1 / "cptlab_export.json").read_text())["auto_tokenizer"] is True

    # the run's own greedy answers at stage 1's end (the rows samples/ kept)
    rows = [row for domain in json.loads((full_run / "samples" / "stage1-step3.json").read_text()).values()
            for row in domain]
    assert rows and auto_greedy(stage1, [r["prompt"] for r in rows]) == [r["completion"] for r in rows]
    # and every held-out prompt's answer as `cptlab eval` on the export gives it
    result = cli("eval", stage1, "--config", full_run / "config.yaml", "--show", "1000", "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output[-2000:]
    rows = [row for domain in json.loads((tmp_path / "e.json").read_text())["samples"].values() for row in domain]
    assert len(rows) == 3 * 16
    assert auto_greedy(stage1, [r["prompt"] for r in rows]) == [r["completion"] for r in rows]


def test_the_character_tokenizer_in_byte_level_spelling_reads_the_same_under_every_class(tmp_path):
    """models.byte_level_form: the same ids and text under PreTrainedTokenizerFast, and under the classes
    AutoTokenizer picks for a qwen2 (Qwen2Tokenizer) and a llama (TokenizersBackend) config; the plain
    spelling loses spaces and newlines under Qwen2Tokenizer (the bug this fixes)."""
    from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    from cptlab.export import auto_tokenizer_agrees
    from cptlab.models import build_tokenizer, byte_level_form

    plain = build_tokenizer()
    byte_level = byte_level_form(plain)
    text = "sort asc: 34 0 27\n\nQ: 4+0 ~{|}\nA: <answer>1</answer><eos><pad>"
    ids = plain(text)["input_ids"]
    assert ids[:4] == [86, 82, 85, 87] and plain.decode(ids) == text  # 's' 'o' 'r' 't': specials, then ' ' = 3 ...
    for name, config, want in (("qwen2", Qwen2Config, "Qwen2Tokenizer"), ("llama", LlamaConfig, "TokenizersBackend")):
        for spelling, tokenizer in (("plain", plain), ("bytes", byte_level)):
            directory = tmp_path / f"{name}-{spelling}"
            tokenizer.save_pretrained(directory)
            config(vocab_size=len(plain)).save_pretrained(directory)
            auto = AutoTokenizer.from_pretrained(directory)
            assert type(auto).__name__ == want
            reads_right = auto(text)["input_ids"] == ids and auto.decode(ids) == text
            assert reads_right is not (name == "qwen2" and spelling == "plain"), (name, spelling)
            assert auto_tokenizer_agrees(directory, plain) is reads_right
            fast = PreTrainedTokenizerFast.from_pretrained(directory)  # how cptlab itself loads it
            assert fast(text)["input_ids"] == ids and fast.decode(ids) == text
    # a tokenizer that is not a character tokenizer is left as it is
    merged = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
        byte_level.backend_tokenizer.to_str()), eos_token="<eos>")
    assert byte_level_form(merged) is None


@pytest.mark.slow
def test_lora_run_exports_merged_and_as_adapter(lora_run, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    reference = logits(run_model(lora_run, "stage2-step3"))  # unmerged: base + (alpha / r) B A at run time
    merged = export_model(lora_run, tmp_path / "merged", stage=2, lora="merge")
    weights = load_file(str(merged / "model.safetensors"))
    assert not any("lora_" in k for k in weights)  # a plain model
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(merged)), reference, atol=1e-5)

    adapter = export_model(lora_run, tmp_path / "adapter", stage=2, lora="adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str((lora_run / "base").resolve())
    assert all("lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    from peft import AutoPeftModelForCausalLM

    assert torch.allclose(logits(AutoPeftModelForCausalLM.from_pretrained(adapter)), reference, atol=1e-5)
    # both load in cptlab eval to the accuracies the run recorded at stage 2's end
    want = recorded(lora_run, 2, 6)
    assert evaluated(cli, merged, lora_run, tmp_path) == want
    assert evaluated(cli, adapter, lora_run, tmp_path) == want
    with pytest.raises(UserError, match="--stage 0 is the base model itself"):
        export_model(lora_run, tmp_path / "base-adapter", stage=0, lora="adapter")


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(full_run, tmp_path, cli):
    def refused(*args: str, needle: str) -> None:
        result = cli("export", *args)
        assert_one_line_error(result, needle)
        assert not result.stdout.strip(), result.stdout  # nothing but the error line

    out = str(tmp_path / "out")
    refused(str(full_run), "--stage", "3", "--out", out,
            needle="--stage 3: the run kept no model there; available: --stage 0 (the base model), --stage 1")
    refused(str(full_run), "--step", "4", "--out", out, needle="--step 4: the run kept no model there")
    refused(str(full_run), "--stage", "1", "--step", "3", "--out", out, needle="give --stage or --step, not both")
    refused(str(full_run), "--lora", "adapter", "--out", out, needle="model.lora.rank = 0")
    refused(str(full_run), "--lora", "merged", "--out", out, needle="--lora 'merged': expected 'merge'")
    refused(str(tmp_path), "--out", out, needle="not a cptlab run directory")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(str(full_run), "--out", str(tmp_path / "full"), needle="already exists and is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_killed_mid_stage_keeps_its_stage_models_and_resumes_to_the_same_ones(full_run, warmup_cache,
                                                                                    tmp_path):
    """Stopped dead in stage 2 after its step-2 checkpoint, then resumed: the same checkpoints are kept
    and stage 1's model exports to the same weights as the uninterrupted run's."""
    cfg = load_config("smoke", [*SMOKE, f"warmup.cache_dir={warmup_cache}"])
    run_until_crash(cfg, tmp_path / "run", stage=2, step=2)  # drawing its third (last) step's prompts
    assert [d.name for d in RunStore.open(tmp_path / "run").checkpoint_dirs()] == ["stage1-step3", "stage2-step2"]
    run_continual(resume=str(tmp_path / "run"))
    assert ([d.name for d in RunStore.open(tmp_path / "run").checkpoint_dirs()]
            == [d.name for d in RunStore.open(full_run).checkpoint_dirs()])
    for run, out in ((full_run, tmp_path / "a"), (tmp_path / "run", tmp_path / "b")):
        export_model(run, out, stage=1)
    assert load_file(str(tmp_path / "a" / "model.safetensors")).keys() == load_file(
        str(tmp_path / "b" / "model.safetensors")).keys()
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_ends_are_kept_only_when_asked(tmp_path):
    """RunStore.commit_checkpoint: keep=1 keeps the newest and the newest stage end; keep_stage_ends keeps
    every trained stage's end as well, but never the base's (stage 0)."""
    def commit(store, stage, step, gstep, done, keep_stage_ends):
        tmp, final = store.new_checkpoint_dir(f"stage{stage}-step{step}")
        (tmp / "model.safetensors").write_bytes(b"w")
        store.commit_checkpoint(tmp, final, dict(stage=stage, step=step, global_step=gstep, stage_done=done,
                                                 order=gstep * 2 + done), 1, keep_stage_ends)

    for keep_ends, want in ((False, ["stage2-step3", "stage3-step1"]),
                            (True, ["stage1-step3", "stage2-step3", "stage3-step1"])):
        store = RunStore.create(tmp_path / str(keep_ends), {"run": {"name": "x"}})
        plan = [(0, 0, 0, True), (1, 2, 2, False), (1, 3, 3, True), (2, 2, 5, False), (2, 3, 6, True), (3, 1, 7, False)]
        for stage, step, gstep, done in plan:
            commit(store, stage, step, gstep, done, keep_ends)
        assert [d.name for d in store.checkpoint_dirs()] == want
        assert not [d for d in store.checkpoints.iterdir() if d.name.startswith(".")]
        store.close()


def test_export_refuses_before_loading_anything(tmp_path):
    with pytest.raises(UserError, match="not a cptlab run directory"):
        export_model(tmp_path, tmp_path / "out")
