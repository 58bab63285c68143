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


# -- model.gradient_checkpointing -------------------------------------------------------------------------

def _grads_of_one_step(checkpointing: bool, lora: bool = False):
    """(loss, {name: grad}, decoder-layer forwards) of one GRPO batch's backward on a 2-layer tiny model."""
    from cptlab.config import LoraConfig, MethodConfig
    from cptlab.lora import apply_lora
    from cptlab.models import build_tiny_model
    from cptlab.step import accumulate_gradients
    from helpers import method_and_batch

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      gradient_checkpointing=checkpointing)
    model = build_tiny_model(cfg, build_tokenizer(), seed=3)
    if lora:
        model = apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    model.train()
    method, batch = method_and_batch(model, MethodConfig(name="grpo"))
    model.train()
    calls = []
    layer = [m for name, m in model.named_modules() if name.endswith("layers.0")][0]
    # a pre-hook: the recompute stops (non-reentrant early stop) inside the MLP once it has what the backward needs
    handle = layer.mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(method, model, batch, local=True)
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads, calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_recomputing_in_the_backward(lora):
    if lora:
        pytest.importorskip("peft")
    loss, grads, calls = _grads_of_one_step(False, lora)
    loss_ckpt, grads_ckpt, calls_ckpt = _grads_of_one_step(True, lora)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    mlp = [g for n, g in grads.items() if ("mlp" in n or "down_proj" in n) and "lora_A" not in n]
    assert len(mlp) >= 2 and all(g.abs().sum() > 0 for g in mlp)  # the layers inside the checkpoint learn
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # the checkpointed layer ran its forward once more, in the backward (the recompute)
    assert len(calls_ckpt) == len(calls) + calls.count(True)


def test_gradient_checkpointing_is_on_for_built_and_loaded_models_and_off_by_default(tmp_path, tokenizer):
    from cptlab.config import load_config
    from cptlab.models import build_tiny_model
    from cptlab.warmup import base_model_key

    cfg = load_config("smoke", ["model.gradient_checkpointing=true"])
    from cptlab.variants import gradient_checkpointing

    built = build_tiny_model(cfg.model, tokenizer)
    assert gradient_checkpointing(built)
    assert not gradient_checkpointing(build_tiny_model(load_config("smoke").model, tokenizer))
    save_model(built, tokenizer, tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), cfg.model, torch.device("cpu"))
    assert gradient_checkpointing(loaded)
    # it changes memory, not values: the warm-up cache is shared with runs that do not checkpoint
    assert base_model_key(cfg) == base_model_key(load_config("smoke"))
