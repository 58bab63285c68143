"""The fast rollout engine against the plain `transformers.generate` path."""

import pytest
import torch

from cptlab.engine import DecodeEngine, unsupported_reason
from cptlab.errors import ConfigError
from cptlab.rollout import SamplingSpec, encode_prompts, generate, make_generator, stop_token_ids, use_fast_engine
from helpers import noisy_model

PROMPTS = ["Q: 1+2\nA:", "Q: a much longer question here\nA:", "Q: x\nA:", "Q: 45 67 8\nA:"]


def greedy(n, engine):
    return SamplingSpec(max_new_tokens=n, greedy=True, engine=engine)


def sampled(n, engine="fast", **kw):
    return SamplingSpec(max_new_tokens=n, engine=engine, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_tokens_equal_transformers_generate(tokenizer, arch):
    m = noisy_model(tokenizer, arch)
    prompts = PROMPTS * 2  # ragged lengths: left padding differs per row
    plain = generate(m, tokenizer, prompts, greedy(30, "plain"))
    fast = generate(m, tokenizer, prompts, greedy(30, "fast"))
    assert len(set(plain.texts)) > 1 and max(len(t) for t in plain.texts) > 10  # a non-trivial check
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    assert torch.equal(plain.completion_mask, fast.completion_mask)
    assert plain.texts == fast.texts


def test_engine_follows_weight_updates(tokenizer):
    m = noisy_model(tokenizer)
    before = generate(m, tokenizer, PROMPTS, greedy(20, "fast"))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.3)
    after = generate(m, tokenizer, PROMPTS, greedy(20, "fast"))
    plain = generate(m, tokenizer, PROMPTS, greedy(20, "plain"))
    assert after.texts == plain.texts and after.texts != before.texts


def test_rows_stop_at_eos_and_the_loop_ends_early(tokenizer):
    m = noisy_model(tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # the tied embedding row of EOS dominates every output logit
        m.model.embed_tokens.weight[eos] = m.model.embed_tokens.weight.sum(0) * 0 + 50.0
        m.model.norm.weight.fill_(1.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"))
    out = eng.generate(m, ids, mask, max_new_tokens=40, stop_ids=[eos], pad_id=tokenizer.pad_token_id)
    assert out.shape[1] < 40  # stopped once every row had emitted EOS
    first_eos = (out == eos).float().argmax(-1)
    for row, k in zip(out, first_eos.tolist()):
        assert row[k] == eos and bool((row[k + 1:] == tokenizer.pad_token_id).all())
    ro = generate(m, tokenizer, PROMPTS, sampled(40), generator=make_generator(0))
    assert ro.completion_ids.shape[1] == int(ro.completion_mask.sum(-1).max())  # trimmed to the longest


def test_sampling_follows_the_model_distribution(tokenizer):
    m = noisy_model(tokenizer, scale=0.2)
    n = 20000
    ids, mask = encode_prompts(tokenizer, ["Q: 7\nA:"] * n, torch.device("cpu"))
    with torch.no_grad():
        probs = (m(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] / 0.7).softmax(-1)
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    out = eng.generate(m, ids, mask, max_new_tokens=1, stop_ids=[], pad_id=0, temperature=0.7)

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
    out = eng.generate(m, ids, mask, max_new_tokens=1, stop_ids=[], pad_id=0, top_p=0.5)
    assert set(out[:, 0].tolist()) <= set(keep.tolist())


def test_same_seed_same_samples(tokenizer):
    m = noisy_model(tokenizer, scale=0.1)
    for engine in ("fast", "plain"):
        a = generate(m, tokenizer, PROMPTS, sampled(16, engine), generator=make_generator(3))
        b = generate(m, tokenizer, PROMPTS, sampled(16, engine), generator=make_generator(3))
        c = generate(m, tokenizer, PROMPTS, sampled(16, engine), generator=make_generator(4))
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
    plain = generate(m, tokenizer, PROMPTS, greedy(24, "plain"))
    fast = generate(m, tokenizer, PROMPTS, greedy(24, "fast"))
    base = generate(noisy_model(tokenizer), tokenizer, PROMPTS, greedy(24, "plain"))
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
        stops = stop_token_ids(m, tokenizer)
        fast = eng.generate(m, ids, mask, max_new_tokens=30, stop_ids=stops, pad_id=tokenizer.pad_token_id, greedy=True)
        with torch.no_grad():  # transformers.generate in float32 (rollout.generate would autocast to bf16)
            plain = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                               eos_token_id=list(stops), pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        width = min(fast.shape[1], plain.shape[1])
        assert width > 5 and torch.equal(fast[:, :width].cpu(), plain[:, :width].cpu())
    assert eng.cuda_graphs and any(st.graphs for st in eng.states.values())


def test_generate_draws_from_its_generator_and_leaves_the_global_rng_alone(tokenizer):
    m = noisy_model(tokenizer, scale=0.1)
    for engine in ("fast", "plain"):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        g = make_generator(5)
        a = generate(m, tokenizer, PROMPTS * 2, sampled(12, engine), generator=g)
        assert torch.equal(torch.get_rng_state(), state)  # no reseeding behind the caller's back
        b = generate(m, tokenizer, PROMPTS * 2, sampled(12, engine), generator=g)
        assert a.texts != b.texts  # the generator advanced
    # a seeded generator's stream is the global one after torch.manual_seed(seed), so seeded runs kept
    # their numbers when generate stopped reseeding the global RNG
    torch.manual_seed(5)
    assert torch.equal(torch.rand(8), torch.rand(8, generator=make_generator(5)))


def _mid_completion_token(m, tokenizer):
    """A token that greedy decoding emits in the middle of row 0 (not before), and row 0's tokens."""
    ro = generate(m, tokenizer, PROMPTS, SamplingSpec(max_new_tokens=20, greedy=True, stop_ids=(), engine="plain"))
    row = ro.completion_ids[0].tolist()
    k = next(k for k in range(3, len(row)) if row[k] not in row[:k])
    return row[k], row[:k + 1]


@pytest.mark.parametrize("engine", ["plain", "fast"])
def test_a_sampled_pad_token_ends_the_completion(engine):
    from cptlab.models import build_tokenizer

    tokenizer = build_tokenizer()
    m = noisy_model(tokenizer)
    x, prefix = _mid_completion_token(m, tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(x)  # now the model "samples a pad" mid-completion
    ro = generate(m, tokenizer, PROMPTS, greedy(20, engine))
    # the completion ends at the pad, which it includes: training attends to exactly what the sampler saw
    assert ro.completion_mask[0].tolist() == [1.0] * len(prefix) + [0.0] * (ro.completion_mask.shape[1] - len(prefix))
    assert ro.completion_ids[0, :len(prefix)].tolist() == prefix
    assert ro.texts[0] == tokenizer.decode(prefix[:-1])


def test_every_eos_id_of_the_generation_config_stops_both_engines(tokenizer):
    """Chat models end a turn with a token their generation_config lists besides the tokenizer's EOS
    (SmolLM2: <|im_end|>); both engines stop there, as transformers.generate does."""
    m = noisy_model(tokenizer)
    x, prefix = _mid_completion_token(m, tokenizer)
    m.generation_config.eos_token_id = [tokenizer.eos_token_id, x]
    assert x in stop_token_ids(m, tokenizer)
    plain = generate(m, tokenizer, PROMPTS, greedy(20, "plain"))
    fast = generate(m, tokenizer, PROMPTS, greedy(20, "fast"))
    assert torch.equal(plain.completion_ids, fast.completion_ids) and plain.texts == fast.texts
    assert fast.completion_ids[0, :len(prefix)].tolist() == prefix and fast.lengths[0] == len(prefix)
    ids, mask = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    with torch.no_grad():  # transformers.generate with the model's own generation config
        hf = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20)[:, ids.shape[1]:]
    assert hf[0, :len(prefix)].tolist() == prefix and bool((hf[0, len(prefix):] == tokenizer.pad_token_id).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_sampling_draws_from_its_generator_only(tokenizer):
    """Replayed CUDA graphs draw from the device's default generator: generate lends it the given
    generator's state, so seeded samples repeat and the caller's CUDA RNG is left as it was."""
    m = noisy_model(tokenizer, scale=0.1).cuda()
    spec = sampled(16, "fast", cuda_graphs=True)
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    a = generate(m, tokenizer, PROMPTS * 2, spec, generator=make_generator(3, "cuda"))
    b = generate(m, tokenizer, PROMPTS * 2, spec, generator=make_generator(3, "cuda"))
    c = generate(m, tokenizer, PROMPTS * 2, spec, generator=make_generator(4, "cuda"))
    assert a.texts == b.texts and a.texts != c.texts
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_engine_state_is_reused_across_prompt_lengths_in_one_bucket(tokenizer):
    """A run's steps have prompts of different lengths and batches of different sizes: the engine serves
    them from one state per (power-of-two batch, 64-column cache) bucket, so on CUDA a decode graph is
    captured once per bucket, not once per step (here on CPU, the same bucketing without graphs)."""
    from cptlab.engine import bucket

    assert bucket(4, 30, 64) == (8, 64) and bucket(9, 64, 64) == (16, 64) and bucket(256, 65, 64) == (256, 128)
    m = noisy_model(tokenizer)
    eng = DecodeEngine(m, dtype=torch.float32, device=torch.device("cpu"), cuda_graphs=False)
    cpu = torch.device("cpu")

    def run(prompts, new_tokens=20):
        ids, mask = encode_prompts(tokenizer, prompts, cpu)
        out = eng.generate(m, ids, mask, max_new_tokens=new_tokens, stop_ids=[tokenizer.eos_token_id],
                           pad_id=tokenizer.pad_token_id, greedy=True)
        return ids.shape[1], out

    short, _ = run(PROMPTS[:1] * 4)  # 4 rows of 9 tokens
    long, out = run(PROMPTS[1:2] * 5)  # 5 rows of 34 tokens: the same (8, 64) bucket
    assert short < long and short + 20 <= 64 and long + 20 <= 64
    assert eng.counts == {"states": 1, "captures": 0, "calls": 2}
    # the bucket's filler rows and extra columns change nothing: the tokens are the plain engine's
    plain = generate(m, tokenizer, PROMPTS[1:2] * 5, greedy(20, "plain"))
    assert out[:, :plain.completion_ids.shape[1]].tolist() == plain.completion_ids.tolist()
    run(PROMPTS * 3)  # 12 rows: batch bucket 16
    run(PROMPTS[1:2], new_tokens=40)  # 74 columns: cache bucket 128
    assert eng.counts == {"states": 3, "captures": 0, "calls": 4}
    run(PROMPTS[:1] * 8)  # back in the first bucket: reused
    assert eng.counts["states"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_is_captured_once_per_bucket_and_mode(tokenizer):
    m = noisy_model(tokenizer, scale=0.1).cuda()
    spec = sampled(16, "fast", cuda_graphs=True)
    from cptlab.engine import engine_for

    for prompts in (PROMPTS[:1] * 8, PROMPTS[1:2] * 8, PROMPTS * 2):  # three prompt lengths, one bucket
        generate(m, tokenizer, prompts, spec, generator=make_generator(0, "cuda"))
    # the model's own device (cuda:0): torch.device("cuda") compares unequal to it and would build a new engine
    eng = engine_for(m, dtype=torch.float32, device=next(m.parameters()).device, cuda_graphs=True)
    assert eng.counts == {"states": 1, "captures": 1, "calls": 3}


@pytest.mark.slow
def test_compiled_decode_layer_gives_the_eager_tokens(tokenizer):
    """rollout.compile_decode: the decode step's layer through torch.compile (its cache write an
    index_put into the state's buffers) samples exactly the eager engine's greedy tokens, and a second
    batch in the same bucket reuses the compiled layer and the state."""
    m = noisy_model(tokenizer)
    eager = generate(m, tokenizer, PROMPTS * 2, greedy(24, "fast"))
    spec = SamplingSpec(max_new_tokens=24, greedy=True, engine="fast", compile_decode=True)
    compiled = generate(m, tokenizer, PROMPTS * 2, spec)
    assert torch.equal(compiled.completion_ids, eager.completion_ids) and compiled.texts == eager.texts
    again = generate(m, tokenizer, PROMPTS[1:], spec)
    assert again.texts == eager.texts[1:4]
    from cptlab.engine import engine_for

    assert engine_for(m, dtype=torch.float32, device=torch.device("cpu"), cuda_graphs=True, compile=True).counts["states"] == 1
