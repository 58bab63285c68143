"""Speed at the study's scale: a Qwen3-1.7B-shaped model (rollout and one GRPO step) and long rollouts
with heavy-tailed lengths, each figure printed beside the arithmetic that bounds it.

    python benchmarks/bench_scale.py qwen3 [--size gpu|tiny] [--batches 64,256] [--prompt-len 64] [--new-tokens 128]
                                           [--engines fast,compiled,plain] [--grpo-prompts 32] [--group-size 8]
                                           [--micro-batch 32] [--steps 1] [--gradient-checkpointing] [--out FILE.json]
    python benchmarks/bench_scale.py long [--model qwen3|76m] [--size gpu|tiny] [--batch 256] [--prompt-len 64]
                                          [--budget 4096] [--out FILE.json]

qwen3: the Qwen3-1.7B architecture (28 layers, hidden 2048, 16 query / 8 KV heads of 128, MLP 6144, q/k
norms, tied embeddings) with a 49,152-token vocabulary (SmolLM2's; prompts are random ids), random init.
Rollout tokens/s of the fast engine (and compiled, and `transformers.generate` on a bfloat16 copy) at each
batch, EOS disabled so every row makes --new-tokens tokens; next to each, the bandwidth bound of the
decode: every step reads the weights once (bfloat16) plus every row's live KV cache (layers x KV heads x
head_dim x 2 (K, V) x 2 bytes per token), at --bandwidth bytes/s (3.0e12: an H100's HBM3 in practice).
Then GRPO steps (--grpo-prompts x --group-size rows): the fast-engine rollout on random prompts, random
rewards (seeded; speed does not depend on them), cptlab's GRPO method and `train_step` (float32 weights,
bfloat16 autocast on CUDA, AdamW), timed by phase, with training tokens/s beside rollout tokens/s.

long: heavy-tailed completion lengths up to --budget: each row's length is drawn from a log-normal
(median --median-len, sigma --sigma) clipped to [8, budget], and --at-budget of the rows (at least one) run
to the budget. A random-init model's stop tokens cannot be steered, so the lengths are planted: today's
engine keeps every row in the batch and allocates its KV cache for the whole budget, so a batch holding one
row at the budget costs exactly rows x budget decode slots, which is what is timed (EOS disabled, budget
tokens). Printed: time, total planted tokens, rows x budget, tokens/s counted both ways, and the KV memory
allocated (rows x (prompt + budget)) against what live tokens need at most (sum of prompt + length): the
gap continuous batching and paged KV (issue 28, item 1) close. An engine whose time tracks the generated
tokens would show useful tokens/s close to today's slot tokens/s.

--size tiny shrinks every shape (CPU, seconds): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

QWEN3_1P7B = dict(vocab_size=49152, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=6144)
"""Qwen3-1.7B's decoder (its config.json), with SmolLM2's 49,152-token vocabulary instead of 151,936."""
QWEN3_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128)
BANDWIDTH = 3.0e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def qwen3_model(size: str, positions: int, device):
    """A random-init Qwen3 model of the 1.7B shape (or the tiny one), float32 weights, on `device`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from cptlab.models import set_compute_dtype

    cfg = Qwen3Config(**(QWEN3_1P7B if size == "gpu" else QWEN3_TINY), max_position_embeddings=positions,
                      tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    set_compute_dtype(model, "auto")
    return model.eval()


def small_model(size: str, positions: int, device):
    """cptlab's 76M GPU model (gpu_model preset; character vocabulary), or the tiny one, random init."""
    from cptlab.config import load_config
    from cptlab.models import build_tiny_model, build_tokenizer

    cfg = load_config("gpu_model" if size == "gpu" else "tiny", [f"model.max_positions={positions}"]).model
    return build_tiny_model(cfg, build_tokenizer(), seed=0).to(device).eval()


def kv_bytes_per_token(model, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token adds to the cache: layers x KV heads x head_dim x 2 x dtype bytes."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * dtype_bytes


def decode_bound(model, batch: int, prompt: int, new: int, bandwidth: float) -> dict:
    """The bandwidth bound of a decode of `new` tokens per row: step t reads the bfloat16 weights once
    and every row's live KV (prompt + t tokens); tokens/s = batch x new / (bytes read / bandwidth)."""
    weights = sum(p.numel() for p in model.parameters()) * 2
    kv = kv_bytes_per_token(model)
    total = sum(weights + batch * (prompt + t) * kv for t in range(new))
    seconds = total / bandwidth
    return dict(weight_bytes=weights, kv_bytes_per_token=kv, mean_bytes_per_step=total / new,
                mean_kv_bytes_per_step=total / new - weights, bandwidth=bandwidth, bound_seconds=seconds,
                bound_tokens_per_second=batch * new / seconds)


def describe_bound(b: dict, batch: int, prompt: int, new: int) -> str:
    return (f"bound {b['bound_tokens_per_second']:,.0f} tok/s = {batch} x {new} tokens / ({new} steps x "
            f"{b['mean_bytes_per_step'] / 1e9:.2f} GB per step [weights {b['weight_bytes'] / 1e9:.2f} GB + KV "
            f"{b['kv_bytes_per_token'] / 1024:.0f} KiB/token x {batch} rows x {prompt + (new - 1) / 2:.0f} mean context "
            f"= {b['mean_kv_bytes_per_step'] / 1e9:.2f} GB] at {b['bandwidth'] / 1e12:.1f} TB/s)")


def engine_run(model, engine: str, device, ids, mask, new: int):
    """A function generating `new` tokens for every row with `engine` (EOS disabled)."""
    from cptlab.engine import engine_for

    if engine in ("fast", "compiled"):
        eng = engine_for(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
                         cuda_graphs=True, compile=engine == "compiled")
        return lambda: eng.generate(model, ids, mask, max_new_tokens=new, stop_ids=(), pad_id=0)
    hf = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0, temperature=1.0,
                  eos_token_id=None, pad_token_id=0)
    return lambda: hf.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]


def time_it(run, device, repeats: int) -> tuple[float, float]:
    """(warm-up seconds, median seconds of `repeats` timed runs)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        run()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return warm, sorted(times)[len(times) // 2]


def random_prompts(batch: int, prompt_len: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def bench_qwen3_rollout(model, a, device) -> list[dict]:
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        ids, mask = random_prompts(batch, a.prompt_len, model.config.vocab_size, device)
        bound = decode_bound(model, batch, a.prompt_len, a.new_tokens, a.bandwidth)
        for engine in a.engines.split(","):
            try:
                warm, seconds = time_it(engine_run(model, engine, device, ids, mask, a.new_tokens), device, a.repeats)
                tps = batch * a.new_tokens / seconds
                rows.append(dict(batch=batch, engine=engine, tokens_per_second=tps, seconds=seconds,
                                 warmup_seconds=warm, fraction_of_bound=tps / bound["bound_tokens_per_second"],
                                 bound=bound))
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at one batch: keep the others
                rows.append(dict(batch=batch, engine=engine, error=f"{type(err).__name__}: {str(err)[:300]}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_qwen3_grpo(model, a, device) -> dict:
    """GRPO steps on the model: fast-engine rollout of random prompts, random rewards, cptlab's GRPO loss
    and train_step (AdamW), timed by phase."""
    from cptlab.config import MethodConfig, PromptConfig, RolloutConfig
    from cptlab.losses import grouped_advantages
    from cptlab.methods import Batch, MethodContext, build_method
    from cptlab.models import build_tokenizer
    from cptlab.optim import make_optimizer
    from cptlab.rollout import Rollout
    from cptlab.step import train_step
    from cptlab.variants import enable_gradient_checkpointing

    if a.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    rows = a.grpo_prompts * a.group_size
    rcfg = RolloutConfig(group_size=a.group_size, max_new_tokens=a.new_tokens)
    mcfg = MethodConfig(name="grpo", micro_batch_size=a.micro_batch, track_base_kl=False)
    ctx = MethodContext(build_tokenizer(), PromptConfig(), rcfg, device, base=None)
    method = build_method(mcfg, ctx, model)
    optimizer = make_optimizer(model, mcfg.lr, mcfg.weight_decay)
    ids, mask = random_prompts(a.grpo_prompts, a.prompt_len, model.config.vocab_size, device)
    ids, mask = ids.repeat_interleave(a.group_size, 0), mask.repeat_interleave(a.group_size, 0)
    group_ids = torch.arange(a.grpo_prompts, device=device).repeat_interleave(a.group_size)
    generate = engine_run(model, "fast", device, ids, mask, a.new_tokens)
    g = torch.Generator().manual_seed(1)
    steps = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1 + a.steps):  # the first: warm-up (graph captures, allocator)
        sync(device)
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            completion = generate()
        model.train()
        ro = Rollout(ids, mask, completion, torch.ones(completion.shape, device=device), [""] * rows, group_ids)
        batch = Batch([None] * rows, ro, rewards=torch.rand(rows, generator=g).round().to(device))
        batch.advantages = grouped_advantages(batch.rewards, group_ids, scale=mcfg.grpo.scale_rewards)
        sync(device)
        t1 = time.perf_counter()
        marks = {}

        def backward_done():
            sync(device)
            marks["backward"] = time.perf_counter()

        result = train_step(method, model, optimizer, batch, micro_batch_size=mcfg.micro_batch_size,
                            grad_clip=mcfg.grad_clip, local=True, after_backward=backward_done)
        sync(device)
        t2 = time.perf_counter()
        steps.append(dict(step=step, seconds=t2 - t0, rollout=t1 - t0, loss_backward=marks["backward"] - t1,
                          optimizer=t2 - marks["backward"], loss=float(result.loss)))
        print(f"  grpo step {step}{' (warm-up)' if step == 0 else ''}: {t2 - t0:.3f} s (rollout {t1 - t0:.3f}, "
              f"loss+backward {marks['backward'] - t1:.3f}, optimizer {t2 - marks['backward']:.3f})", flush=True)
    timed = steps[1:]
    train_s = sum(s["loss_backward"] + s["optimizer"] for s in timed) / len(timed)
    rollout_s = sum(s["rollout"] for s in timed) / len(timed)
    return dict(rows=rows, prompt_len=a.prompt_len, new_tokens=a.new_tokens, micro_batch=a.micro_batch,
                gradient_checkpointing=a.gradient_checkpointing, steps=steps,
                seconds_per_step=sum(s["seconds"] for s in timed) / len(timed),
                rollout_tokens_per_second=rows * a.new_tokens / rollout_s,
                train_tokens_per_second=rows * (a.prompt_len + a.new_tokens) / train_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def heavy_tailed_lengths(rows: int, budget: int, median: float, sigma: float, at_budget: float, seed: int = 0):
    """Planted completion lengths: log-normal (median, sigma) clipped to [8, budget], and a fraction
    `at_budget` of the rows (at least one) exactly at the budget."""
    g = torch.Generator().manual_seed(seed)
    lengths = (math.log(median) + sigma * torch.randn(rows, generator=g)).exp().round().clamp(8, budget).long()
    n_full = max(1, round(at_budget * rows))
    lengths[torch.randperm(rows, generator=g)[:n_full]] = budget
    return lengths


def bench_long(a, device) -> dict:
    positions = a.prompt_len + a.budget + 64
    model = (qwen3_model if a.model == "qwen3" else small_model)(a.size, positions, device)
    from cptlab.models import count_parameters

    lengths = heavy_tailed_lengths(a.batch, a.budget, a.median_len or a.budget / 16, a.sigma, a.at_budget)
    ids, mask = random_prompts(a.batch, a.prompt_len, model.config.vocab_size, device)
    warm, seconds = time_it(engine_run(model, "fast", device, ids, mask, a.budget), device, a.repeats)
    generated, slots = int(lengths.sum()), a.batch * a.budget
    kv = kv_bytes_per_token(model)
    out = dict(model=a.model, parameters=count_parameters(model), rows=a.batch, budget=a.budget,
               prompt_len=a.prompt_len, seconds=seconds, warmup_seconds=warm, generated_tokens=generated,
               rows_x_budget=slots, generated_fraction=generated / slots,
               rows_at_budget=int((lengths == a.budget).sum()), median_length=float(lengths.median()),
               mean_length=float(lengths.float().mean()),
               slot_tokens_per_second=slots / seconds, generated_tokens_per_second=generated / seconds,
               kv_bytes_per_token=kv, kv_allocated_bytes=a.batch * (a.prompt_len + a.budget) * kv,
               kv_live_max_bytes=int((lengths + a.prompt_len).sum()) * kv,
               length_quantiles={q: float(lengths.float().quantile(q)) for q in (0.5, 0.9, 0.99)})
    if a.model == "qwen3":
        out["bound_full_budget"] = decode_bound(model, a.batch, a.prompt_len, a.budget, a.bandwidth)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["qwen3", "long"])
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="64,256", help="qwen3: rollout batches")
    p.add_argument("--batch", type=int, default=256, help="long: rows")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--engines", default="fast,compiled,plain")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--grpo-prompts", type=int, default=32, help="qwen3: prompts per GRPO step (0: no GRPO step)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1, help="qwen3: timed GRPO steps after one warm-up step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--model", choices=["qwen3", "76m"], default="qwen3", help="long: the model")
    p.add_argument("--budget", type=int, default=4096, help="long: max new tokens")
    p.add_argument("--median-len", type=float, default=None, help="long: median planted length (default budget/16)")
    p.add_argument("--sigma", type=float, default=1.2, help="long: log-normal sigma of the lengths")
    p.add_argument("--at-budget", type=float, default=0.01, help="long: fraction of rows at the budget")
    p.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="bytes/s of the bound (default 3.0e12)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from cptlab.models import count_parameters, resolve_device

    device = resolve_device(a.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    if a.case == "qwen3":
        model = qwen3_model(a.size, a.prompt_len + a.new_tokens + 64, device)
        n = count_parameters(model)
        print(f"qwen3 shape ({a.size}): {n / 1e9:.3f}B parameters, vocab {model.config.vocab_size}, on {where}; "
              f"prompt {a.prompt_len}, {a.new_tokens} new tokens, median of {a.repeats}")
        rows = bench_qwen3_rollout(model, a, device)
        for r in rows:
            if "error" in r:
                print(f"  b{r['batch']:<4d} {r['engine']:8s} error: {r['error']}")
                continue
            print(f"  b{r['batch']:<4d} {r['engine']:8s} {r['tokens_per_second']:10,.0f} tok/s "
                  f"({r['fraction_of_bound']:.0%} of the {describe_bound(r['bound'], r['batch'], a.prompt_len, a.new_tokens)})")
        grpo = bench_qwen3_grpo(model, a, device) if a.grpo_prompts > 0 else None
        if grpo:
            print(f"  GRPO {grpo['rows']} rows x {a.new_tokens} tokens: {grpo['seconds_per_step']:.3f} s/step; rollout "
                  f"{grpo['rollout_tokens_per_second']:,.0f} tok/s, training (loss+backward+AdamW) "
                  f"{grpo['train_tokens_per_second']:,.0f} tok/s (prompt + completion), peak "
                  f"{grpo['peak_gib'] if grpo['peak_gib'] is None else round(grpo['peak_gib'], 1)} GiB")
        result = dict(case="qwen3", device=where, parameters=n, args=vars(a), rollout=rows, grpo=grpo)
    else:
        result = dict(case="long", device=where, args=vars(a), **bench_long(a, device))
        r = result
        print(f"long rollout ({r['model']}, {r['parameters'] / 1e6:.1f}M parameters, {a.size}) on {where}: {r['rows']} rows, "
              f"budget {r['budget']}, planted lengths median {r['median_length']:.0f}, mean {r['mean_length']:.0f}, "
              f"{r['rows_at_budget']} at the budget")
        print(f"  {r['seconds']:.2f} s for {r['generated_tokens']:,} generated tokens = {r['generated_fraction']:.1%} "
              f"of rows x budget {r['rows_x_budget']:,}: {r['generated_tokens_per_second']:,.0f} generated tok/s, "
              f"{r['slot_tokens_per_second']:,.0f} slot tok/s (today's time tracks rows x budget)")
        print(f"  KV cache: allocated {r['kv_allocated_bytes'] / 1e9:.2f} GB (rows x (prompt + budget) x "
              f"{r['kv_bytes_per_token'] / 1024:.0f} KiB), live tokens need at most {r['kv_live_max_bytes'] / 1e9:.2f} GB")
        if "bound_full_budget" in r:
            b = r["bound_full_budget"]
            print(f"  rows x budget at the bandwidth bound: {b['bound_seconds']:.2f} s ({b['bound_tokens_per_second']:,.0f} "
                  f"slot tok/s at {b['bandwidth'] / 1e12:.1f} TB/s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
