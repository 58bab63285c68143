"""The fast rollout engine against the plain `transformers.generate` path."""

import pytest
import torch

from cptlab.config import ModelConfig
from cptlab.engine import DecodeEngine, unsupported_reason
from cptlab.errors import ConfigError
from cptlab.models import build_tiny_model
from cptlab.rollout import encode_prompts, generate, use_fast_engine

PROMPTS = ["Q: 1+2\nA:", "Q: a much longer question here\nA:", "Q: x\nA:", "Q: 45 67 8\nA:"]


def noisy_model(tokenizer, arch="qwen2", seed=1, scale=0.3):
    """A random model with large enough weights that greedy decoding is not one repeated token."""
    m = build_tiny_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64), tokenizer, seed=0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_tokens_equal_transformers_generate(tokenizer, arch):
    m = noisy_model(tokenizer, arch)
    prompts = PROMPTS * 2  # ragged lengths: left padding differs per row
    plain = generate(m, tokenizer, prompts, max_new_tokens=30, greedy=True, engine="plain")
    fast = generate(m, tokenizer, prompts, max_new_tokens=30, greedy=True, engine="fast")
    assert len(set(plain.texts)) > 1 and max(len(t) for t in plain.texts) > 10  # a non-trivial check
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    assert torch.equal(plain.completion_mask, fast.completion_mask)
    assert plain.texts == fast.texts


def test_engine_follows_weight_updates(tokenizer):
    m = noisy_model(tokenizer)
    before = generate(m, tokenizer, PROMPTS, max_new_tokens=20, greedy=True, engine="fast")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.3)
    after = generate(m, tokenizer, PROMPTS, max_new_tokens=20, greedy=True, engine="fast")
    plain = generate(m, tokenizer, PROMPTS, max_new_tokens=20, greedy=True, engine="plain")
    assert after.texts == plain.texts and after.texts != before.texts


def test_rows_stop_at_eos_and_the_loop_ends_early(tokenizer):
    m = noisy_model(tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # the tied embedding row of EOS dominates every output logit
        m.model.embed_tokens.weight[eos] = m.model.embed_tokens.weight.sum(0) * 0 + 50.0
        m.model.norm.weight.fill_(1.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"))
    out = eng.generate(m, ids, mask, max_new_tokens=40, eos_id=eos, pad_id=tokenizer.pad_token_id)
    assert out.shape[1] < 40  # stopped once every row had emitted EOS
    first_eos = (out == eos).float().argmax(-1)
    for row, k in zip(out, first_eos.tolist()):
        assert row[k] == eos and bool((row[k + 1:] == tokenizer.pad_token_id).all())
    ro = generate(m, tokenizer, PROMPTS, max_new_tokens=40, engine="fast")
    assert ro.completion_ids.shape[1] == int(ro.completion_mask.sum(-1).max())  # trimmed to the longest


def test_sampling_follows_the_model_distribution(tokenizer):
    m = noisy_model(tokenizer, scale=0.2)
    n = 20000
    ids, mask = encode_prompts(tokenizer, ["Q: 7\nA:"] * n, torch.device("cpu"))
    with torch.no_grad():
        probs = (m(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] / 0.7).softmax(-1)
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    out = eng.generate(m, ids, mask, max_new_tokens=1, eos_id=-1, pad_id=0, temperature=0.7)

    def tv(draws):
        return 0.5 * float((torch.bincount(draws, minlength=probs.shape[0]).float() / n - probs).abs().sum())

    reference = tv(torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(1)))
    assert tv(out[:, 0]) < 1.5 * reference + 0.005  # as close to the model as exact categorical draws


def test_top_p_never_samples_outside_the_nucleus(tokenizer):
    m = noisy_model(tokenizer, scale=0.3)
    ids, mask = encode_prompts(tokenizer, ["Q: 7\nA:"] * 500, torch.device("cpu"))
    with torch.no_grad():
        probs = m(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = order[: int((sorted_p.cumsum(0) < 0.5).sum()) + 1]
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"))
    out = eng.generate(m, ids, mask, max_new_tokens=1, eos_id=-1, pad_id=0, top_p=0.5)
    assert set(out[:, 0].tolist()) <= set(keep.tolist())


def test_same_seed_same_samples(tokenizer):
    m = noisy_model(tokenizer, scale=0.1)
    a = generate(m, tokenizer, PROMPTS, max_new_tokens=16, seed=3, engine="fast")
    b = generate(m, tokenizer, PROMPTS, max_new_tokens=16, seed=3, engine="fast")
    c = generate(m, tokenizer, PROMPTS, max_new_tokens=16, seed=4, engine="fast")
    assert a.texts == b.texts and a.texts != c.texts


def test_unsupported_architecture_falls_back_or_is_refused(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert unsupported_reason(gpt2) is not None
    assert not use_fast_engine(gpt2, "auto")
    with pytest.raises(ConfigError, match="rollout.engine"):
        use_fast_engine(gpt2, "fast")
    assert unsupported_reason(noisy_model(tokenizer)) is None and use_fast_engine(noisy_model(tokenizer), "auto")


def test_lora_model_samples_from_merged_weights(tokenizer):
    from cptlab.config import LoraConfig
    from cptlab.lora import apply_lora

    m = apply_lora(noisy_model(tokenizer), LoraConfig(rank=4), seed=0)
    with torch.no_grad():  # non-zero adapters (B starts at zero)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    plain = generate(m, tokenizer, PROMPTS, max_new_tokens=24, greedy=True, engine="plain")
    fast = generate(m, tokenizer, PROMPTS, max_new_tokens=24, greedy=True, engine="fast")
    base = generate(noisy_model(tokenizer), tokenizer, PROMPTS, max_new_tokens=24, greedy=True, engine="plain")
    assert fast.texts == plain.texts and fast.texts != base.texts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_graph_engine_matches_plain_on_gpu(tokenizer, arch):
    """On CUDA, in float32: the captured-graph decode loop gives transformers.generate's greedy tokens,
    across two calls of different batch and prompt shapes (graphs and buffers reused or re-made)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    m = noisy_model(tokenizer, arch).cuda()
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cuda"), cuda_graphs=True)
    for prompts in (PROMPTS * 2, PROMPTS[:3] * 5, PROMPTS * 2):
        ids, mask = encode_prompts(tokenizer, prompts, torch.device("cuda"))
        fast = eng.generate(m, ids, mask, max_new_tokens=30, eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id, greedy=True)
        with torch.no_grad():  # transformers.generate in float32 (rollout.generate would autocast to bf16)
            plain = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        width = min(fast.shape[1], plain.shape[1])
        assert width > 5 and torch.equal(fast[:, :width].cpu(), plain[:, :width].cpu())
    assert eng.cuda_graphs and any(st.graphs for st in eng.states.values())
