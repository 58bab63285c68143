"""LoRA through peft (model.lora): only adapters train, the base reference is the untouched base,
drift reads W + (alpha / r) * B @ A under the base model's names, and runs, teachers, checkpoints and
resumes work with a wrapped model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from cptlab.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cptlab.config import LoraConfig, ModelConfig, load_config  # noqa: E402
from cptlab.api import run_continual  # noqa: E402
from cptlab.errors import ConfigError, UserError  # noqa: E402
from cptlab.lora import apply_lora, is_adapter_key  # noqa: E402
from cptlab.variants import base_reference, copy_sharing_base_weights, effective_state_dict  # noqa: E402
from cptlab.models import build_tiny_model, build_tokenizer  # noqa: E402
from cptlab.optim import make_optimizer  # noqa: E402
from cptlab.store import RunStore  # noqa: E402
from cptlab.teacher import ema_update, make_teacher  # noqa: E402
from helpers import records, run_until_crash, sdpo_config  # noqa: E402

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[5, 9, 13, 17, 21, 25], [6, 10, 14, 18, 22, 26]])


def plain_model():
    tok = build_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, tok, seed=0).eval()


def lora_model(**kw):
    """(wrapped model, the base's state dict and logits on IDS before wrapping)."""
    model = plain_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(IDS).logits
    cfg = LoraConfig(**{"rank": RANK, "alpha": ALPHA, "target_modules": TARGETS, **kw})
    return apply_lora(model, cfg).eval(), state, logits


def train_one_step(model, lr: float = 1e-2) -> None:
    optimizer = make_optimizer(model, lr, weight_decay=0.0)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def adapter_tensors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """'model.layers.0.self_attn.q_proj' -> (A [r, in], B [out, r]) read straight from the modules."""
    inner = model.get_base_model()
    return {name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for name, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# -- wrapping ---------------------------------------------------------------------------------------

def test_only_adapter_tensors_require_grad():
    model, _, _ = lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * 2  # A and B, per target, per layer
    optimizer = make_optimizer(model, 1e-3, 0.0)
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    hidden, kv = 32, 16  # q_proj: 32 -> 32, v_proj: 32 -> 16 (one kv head of 16)
    assert in_optimizer == 2 * RANK * ((hidden + hidden) + (hidden + kv))


def test_rank_zero_changes_nothing():
    model = plain_model()
    assert apply_lora(model, LoraConfig(rank=0)) is model
    sd = effective_state_dict(model)
    assert sd.keys() == model.state_dict().keys()
    base = base_reference(model)
    assert base is not model and not any(p.requires_grad for p in base.parameters()) and not base.training
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n  # a real copy


def test_unknown_target_module_names_the_field_and_what_exists():
    with pytest.raises(ConfigError) as err:
        lora_model(target_modules=["q_proj", "qkv"])
    msg = str(err.value)
    assert "\n" not in msg and "model.lora.target_modules" in msg and "'qkv'" in msg
    assert "q_proj" in msg and "down_proj" in msg  # what the model has


def test_missing_peft_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UserError, match=r"pip install 'cptlab\[lora\]'"):
        apply_lora(plain_model(), LoraConfig(rank=4))


def test_wrapped_layer_is_a_callable_module_computing_w_plus_scaled_ba():
    model, _, _ = lora_model()
    train_one_step(model)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = x @ (q.base_layer.weight + (ALPHA / RANK) * B @ A).T + q.base_layer.bias
    torch.testing.assert_close(q(x), expected)


# -- the merged weights and the base reference ------------------------------------------------------

def test_effective_state_dict_is_base_plus_scaled_ba_under_base_names():
    model, base_state, _ = lora_model()
    train_one_step(model)
    merged = effective_state_dict(model)
    assert merged.keys() == base_state.keys()
    adapters = adapter_tensors(model)
    changed = {k for k in merged if not torch.equal(merged[k], base_state[k])}
    assert changed == {f"{name}.weight" for name in adapters}  # only target weights moved
    assert all(k.split(".")[-2] in TARGETS for k in changed)
    for name, (A, B) in adapters.items():
        by_hand = base_state[f"{name}.weight"] + (ALPHA / RANK) * B @ A
        torch.testing.assert_close(merged[f"{name}.weight"], by_hand, rtol=0, atol=1e-6)
    # not merged in place: the live layer still holds the base weight
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert not q.merged and torch.equal(q.base_layer.weight, base_state["model.layers.0.self_attn.q_proj.weight"])


def test_base_reference_is_the_unwrapped_base_sharing_frozen_weights():
    model, base_state, base_logits = lora_model()
    train_one_step(model)
    base = base_reference(model)
    assert type(base).__name__ == "Qwen2ForCausalLM" and not base.training
    assert not any(p.requires_grad for p in base.parameters())
    assert base.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).logits, base_logits)
        assert not torch.allclose(model(input_ids=IDS).logits, base_logits)  # the adapters act
    live = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.model.layers[0].self_attn.q_proj.weight.data_ptr() == live.data_ptr()  # no second copy


# -- teachers and checkpoints -----------------------------------------------------------------------

def test_ema_teacher_moves_the_adapters_only():
    model, base_state, _ = lora_model()
    teacher = make_teacher("ema", model, ema_rate=0.25)
    before = adapter_tensors(teacher.copy)
    train_one_step(model)
    teacher.update()
    student, after = adapter_tensors(model), adapter_tensors(teacher.copy)
    for name, (A, B) in after.items():
        torch.testing.assert_close(B, 0.75 * before[name][1] + 0.25 * student[name][1])
        torch.testing.assert_close(A, 0.75 * before[name][0] + 0.25 * student[name][0])
    merged = effective_state_dict(teacher.copy)
    assert merged.keys() == base_state.keys()
    assert all(torch.equal(merged[k], v) for k, v in base_state.items() if k.split(".")[-2] not in TARGETS)


def test_frozen_teacher_from_base_scores_like_the_base():
    model, _, base_logits = lora_model()
    train_one_step(model)
    teacher = make_teacher("frozen", model, base=base_reference(model), source="base")
    torch.testing.assert_close(teacher.logits(lambda m: m(IDS).logits), base_logits)
    ema = make_teacher("ema", model, ema_rate=0.5, base=base_reference(model), source="base")
    torch.testing.assert_close(ema.logits(lambda m: m(IDS).logits), base_logits)  # adapters' B zeroed
    assert ema.state_dict()["teacher"] and all(is_adapter_key(k) for k in ema.state_dict()["teacher"])


def test_stable_teacher_copies_adapters_only_and_mixes_the_merged_weights_exactly_with_the_base_anchor():
    model, base_state, base_logits = lora_model()
    train_one_step(model)  # B != 0: the student computes W0 + (alpha / r) B A
    student = effective_state_dict(model)
    teacher = make_teacher("stable", model, gamma=0.4, anchor="base")
    merged = effective_state_dict(teacher.copy)
    for k, w0 in base_state.items():  # (1 - gamma) W0 + gamma (W0 + delta) = W0 + gamma delta, every matrix
        torch.testing.assert_close(merged[k], 0.6 * w0 + 0.4 * student[k])
    assert any(not torch.equal(student[k], w0) for k, w0 in base_state.items())
    assert all(is_adapter_key(k) for k in teacher.state_dict()["teacher"])
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for n, p in teacher.copy.named_parameters() if not is_adapter_key(n))
    torch.testing.assert_close(make_teacher("stable", model, gamma=0.0, anchor="base").logits(lambda m: m(IDS).logits),
                               base_logits)


def test_stable_teacher_with_the_stage_start_anchor_mixes_each_adapter_tensor():
    model, _, _ = lora_model()
    train_one_step(model)
    start = adapter_tensors(model)
    teacher = make_teacher("stable", model, gamma=0.25, anchor="stage_start", restart_after=frozenset({1}))
    train_one_step(model)
    teacher.update()
    now, mixed = adapter_tensors(model), adapter_tensors(teacher.copy)
    for name, (A, B) in mixed.items():  # A and B each 0.75 * start + 0.25 * now (not the merged mix: BA is bilinear)
        torch.testing.assert_close(A, 0.75 * start[name][0] + 0.25 * now[name][0])
        torch.testing.assert_close(B, 0.75 * start[name][1] + 0.25 * now[name][1])
    assert all(is_adapter_key(k) for k in teacher.state_dict()["teacher_anchor"])


def sdpo_method(model):
    from cptlab.config import MethodConfig, PromptConfig, RolloutConfig
    from cptlab.methods import MethodContext, build_method

    cfg = MethodConfig(name="sdpo", sdpo=sdpo_config(teacher_mode="ema", ema_rate=0.5))
    return build_method(cfg, MethodContext(None, PromptConfig(), RolloutConfig(), torch.device("cpu")), model)


def test_checkpoint_holds_adapters_only_and_restores_them(tmp_path):
    model, _, _ = lora_model()
    method = sdpo_method(model)
    optimizer = make_optimizer(model, 1e-2, 0.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    method.after_batch()
    store = RunStore.create(tmp_path / "r", {"run": {"name": "x"}})
    path = save_checkpoint(store, "stage1-step1", {"order": 1}, model, optimizer, method)
    for name in ("model.safetensors", "teacher.safetensors"):
        keys = load_file(str(path / name)).keys()
        assert keys and all(is_adapter_key(k) for k in keys), name

    fresh, _, _ = lora_model()  # the same base, new adapters (B = 0)
    fresh_method = sdpo_method(fresh)
    fresh_optimizer = make_optimizer(fresh, 1e-2, 0.0)
    load_checkpoint(path, fresh, fresh_optimizer, fresh_method)
    for a, b in ((model, fresh), (method.teacher.copy, fresh_method.teacher.copy)):
        want, got = effective_state_dict(a), effective_state_dict(b)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


# -- whole runs -------------------------------------------------------------------------------------

LORA_SMOKE = ["model.lora.rank=4", "run.report=false", "run.device=cpu"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, warmup_cache) -> Path:
    """The smoke preset with LoRA; its base goes into a warm-up cache that `crashed_lora_run` reads."""
    cfg = load_config("smoke", [*LORA_SMOKE, f"warmup.cache_dir={warmup_cache}"])
    return run_continual(cfg, out_dir=str(tmp_path_factory.mktemp("lora") / "run"))


@pytest.fixture(scope="module")
def crashed_lora_run(tmp_path_factory, warmup_cache, lora_run) -> Path:
    """The same run (its base from the warm-up cache), stopped dead in the SDPO stage (EMA teacher)
    after its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("lora-crashed") / "run"
    cfg = load_config("smoke", [*LORA_SMOKE, f"warmup.cache_dir={warmup_cache}"])
    run_until_crash(cfg, out, stage=2, step=2)
    return out


@pytest.mark.slow
def test_lora_smoke_run_completes_and_drift_reads_the_merged_delta(lora_run):
    events = [r["event"] for r in records(lora_run, drop=("base",))]
    assert events[0] == "run_start" and events[-1] == "run_end"
    assert json.loads((lora_run / "summary.json").read_text())["complete"]
    drift = {r["stage"]: r for r in records(lora_run, drop=("base",)) if r["event"] == "drift"}
    assert sorted(drift) == [0, 1, 2] and drift[0]["param/rel_l2_base"] == 0.0
    # the SDPO stage always has a gradient: the merged weights moved, in adapted layers only
    assert drift[2]["param/rel_l2_base"] > 0 and drift[2]["param/rel_l2_prev"] > 0
    assert drift[2]["param/rel_l2_base/attention"] > 0 and drift[2]["param/rel_l2_base/mlp"] > 0
    assert drift[2]["param/rel_l2_base/embedding"] == 0 and drift[2]["param/rel_l2_base/norm"] == 0
    # the run's base is a plain HF model (no adapter tensors): analyses and `eval` can load it alone
    assert not any(is_adapter_key(k) for k in load_file(str(lora_run / "base" / "model.safetensors")))


@pytest.mark.slow
def test_lora_run_from_warmup_cache_resumes_to_the_uninterrupted_records(crashed_lora_run, lora_run):
    first = json.loads((crashed_lora_run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["base"]["source"] == "cache"
    latest = RunStore.open(crashed_lora_run).checkpoint_dirs()[-1]
    assert latest.name == "stage2-step2"
    for name in ("model.safetensors", "teacher.safetensors"):
        assert all(is_adapter_key(k) for k in load_file(str(latest / name))), name
    run_continual(resume=str(crashed_lora_run))
    # drift vs the previous stage too: its end weights come from the stage-end checkpoint (adapters)
    resumed, uninterrupted = records(crashed_lora_run, drop=("base",)), records(lora_run, drop=("base",))
    assert [r["param/rel_l2_prev"] > 0 for r in resumed if r["event"] == "drift" and r["stage"] == 2] == [True]
    # compared as JSON text: older runs' drift records held NaN (effective rank of a zero update), and NaN != NaN
    assert json.dumps(resumed) == json.dumps(uninterrupted)


def test_adapter_init_depends_on_the_seed_not_on_the_rng_stream_before():
    torch.manual_seed(7)
    first = adapter_tensors(lora_model()[0])
    torch.manual_seed(7)
    torch.rand(1000)  # e.g. a warm-up that ran before (a cached base draws nothing)
    after_draws = adapter_tensors(lora_model()[0])
    assert all(torch.equal(first[n][0], after_draws[n][0]) for n in first)
    other = adapter_tensors(apply_lora(plain_model(), LoraConfig(rank=RANK, target_modules=TARGETS), seed=8))
    assert not any(torch.equal(first[n][0], other[n][0]) for n in first)
    before = torch.get_rng_state()
    lora_model()
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched


def test_gradients_left_on_the_base_are_dropped():
    model = plain_model()
    model(input_ids=IDS, labels=IDS).loss.backward()  # as the warm-up leaves them
    wrapped = apply_lora(model, LoraConfig(rank=RANK, target_modules=TARGETS))
    assert all(p.grad is None for p in wrapped.parameters())


def test_dotted_target_suffix_is_accepted_as_peft_matches_it():
    model, _, _ = lora_model(target_modules=["self_attn.q_proj"])
    assert {n.split(".")[-1] for n in adapter_tensors(model)} == {"q_proj"}


def test_copy_sharing_base_weights_makes_an_ema_teacher_without_a_second_model():
    model, _, _ = lora_model()
    teacher = copy_sharing_base_weights(model).eval().requires_grad_(False)
    shared = {p.data_ptr() for p in model.parameters()}
    own = [n for n, p in teacher.named_parameters() if p.data_ptr() not in shared]
    assert own and all(is_adapter_key(n) for n in own)  # only the adapters are copied
    before = adapter_tensors(teacher)
    train_one_step(model)
    ema_update(teacher, model, 0.5)
    student = adapter_tensors(model)
    for name, (A, B) in adapter_tensors(teacher).items():
        torch.testing.assert_close(B, 0.5 * before[name][1] + 0.5 * student[name][1])
    assert any(p.requires_grad for p in model.parameters())  # the student is left trainable
