import pytest
import torch

from cptlab.config import EvalConfig, ModelConfig, PromptConfig, RolloutConfig
from cptlab.errors import UserError
from cptlab.evaluate import evaluate_domain
from cptlab.models import build_tokenizer, check_model_dir, load_model, save_model
from cptlab.rollout import SamplingSpec


def test_tokenizer_roundtrip_and_answer_tags_are_single_tokens(tokenizer):
    text = "Q: sort asc: 3 1\nA: <answer>1 3</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer("<answer>", add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.padding_side == "left"


def test_saved_model_loads_back_and_evaluates_identically(tmp_path, tiny_model, tokenizer):
    save_model(tiny_model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded, tok2 = load_model(str(tmp_path / "m"), ModelConfig(), torch.device("cpu"))
    text = "Q: sort asc: 3 1\nA: 1 3 <answer>1 3</answer>"
    assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]  # spaces and newlines survive a reload
    assert tok2.decode(tok2(text)["input_ids"]) == text
    ecfg = EvalConfig(num_prompts=8, num_samples=2, max_new_tokens=12, temperature=1.0, save_samples=4)
    spec = SamplingSpec.for_eval(ecfg, RolloutConfig())
    a = evaluate_domain(tiny_model, tokenizer, "sorting", ecfg, PromptConfig(), spec, seed=1)
    b = evaluate_domain(loaded, tok2, "sorting", ecfg, PromptConfig(), spec, seed=1)
    assert a.metrics() == b.metrics()
    assert [s["completion"] for s in a.samples] == [s["completion"] for s in b.samples]


def test_missing_dir_and_pickle_only_refused(tmp_path, tiny_model, tokenizer):
    with pytest.raises(UserError, match="not a directory"):
        check_model_dir(str(tmp_path / "nope"))
    d = tmp_path / "pickled"
    save_model(tiny_model, tokenizer, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights"):
        check_model_dir(str(d))
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        check_model_dir(str(d))


def test_corrupt_weights_are_a_user_error(tmp_path, tiny_model, tokenizer):
    d = tmp_path / "bad"
    save_model(tiny_model, tokenizer, d)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="cannot load"):
        load_model(str(d), ModelConfig(), torch.device("cpu"))
