"""cptlab vs TRL: the same GRPO step in TRL's GRPOTrainer and in cptlab, side by side (issue: bench_vs_trl).

    python benchmarks/bench_vs_trl.py [--size tiny|gpu | --model-dir DIR] [--device auto] [--steps 5]
        [--warmup-steps 2] [--prompts 8] [--group-size 8] [--max-new-tokens 64] [--lr 1e-5]
        [--variants all | cptlab:fast,trl:default,...] [--out results.json]

TRL is not a cptlab dependency: install it into the benchmark's environment from
benchmarks/trl_requirements.txt (that file says how, also for a machine without network).

One step, on both sides, is: sample G completions for each of P prompts (at most C new tokens,
temperature 1), score them with cptlab's verifier, group-normalised advantages, the clipped policy
gradient loss ("grpo" aggregation, beta = 0 so no reference model, one update per batch so no old
log-prob pass), backward over the whole batch, gradient clipping at 1.0 and one AdamW step (betas
0.9/0.99, eps 1e-8, no weight decay, constant lr). Weights are float32 on both sides (--weights-dtype bfloat16: bf16 on both); on CUDA both
run the forwards under bfloat16 autocast (TRL: bf16=True). Gradient checkpointing, on by default in
TRL's config, is off, as it is in cptlab (at these sizes it only costs time).

Batch semantics: TRL's per_device_train_batch_size counts completions, so it is P * G here, with
gradient_accumulation_steps = 1 (TRL then generates one batch of P * G per optimizer step, the same as
cptlab's prompts_per_step = P with group_size = G). TRL's dataset is not shuffled, so both sides see
the same prompts in the same order.

Completion length: a built model (--size) gets an end-of-sequence token the model cannot emit (an id
one past its vocabulary), so both sides always generate C tokens per completion (cptlab's completion mask
also leaves out a sampled <pad> token, so its length column reads a little below C). With --model-dir
the model may stop early; the table shows the mean length each side produced.

Variants: cptlab:fast (cptlab's decode engine: static KV cache, CUDA graphs on GPU) and cptlab:plain
(transformers.generate); trl:default (TRL's default generation: transformers.generate with a dynamic
cache), trl:static (cache_implementation="static"), trl:static_compile (static cache with the decode
step compiled by transformers; TRL builds its GenerationConfig with disable_compile=True, so this
variant flips it back after constructing the trainer; CUDA only, prompts padded to a multiple of 32 to
keep shapes stable) and trl:paged (use_transformers_continuous_batching=True; TRL casts the policy to
bfloat16 in place for it under bf16). Steps/s is measured
from the start of the first timed step to the end of the last one (the whole loop: data, generation,
reward, loss, backward, optimizer), after --warmup-steps untimed steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from cptlab.config import ModelConfig, load_config
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, load_model, resolve_device, save_model
from cptlab.prompts import student_prompt
from cptlab.tasks import Example, make_split, verify

SIZES = {
    "tiny": ModelConfig(),  # ~0.7M parameters: the tiny preset's decoder, for CPU
    "gpu": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                       max_positions=512),  # ~76M parameters
}
# every variant the bench knows, and what it generates with (cptlab's first, then TRL's)
GENERATION = {
    "cptlab:fast": "cptlab engine (static KV cache, CUDA graphs on GPU)",
    "cptlab:plain": "transformers.generate",
    "trl:default": "transformers.generate (dynamic cache)",
    "trl:static": 'cache_implementation="static"',
    "trl:static_compile": "static cache + compiled decode",
    "trl:paged": "transformers continuous batching",
}


def build_model_dir(size: str, path: Path) -> Path:
    """A random-init decoder with cptlab's tokenizer, saved as a normal HF directory."""
    tok = build_tokenizer()
    model = build_tiny_model(SIZES[size], tok, seed=0)
    # a random model never learned to stop: make EOS a token it cannot emit (id = its vocabulary size),
    # so that both implementations always generate exactly max_new_tokens tokens
    tok.add_special_tokens({"eos_token": "<never>"})
    assert tok.eos_token_id == model.config.vocab_size
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    save_model(model, tok, path)
    return path


@dataclass
class Workload:
    """What every variant gets: the same model directory, examples and prompt texts."""

    model_dir: Path
    examples: list[Example]
    """P * (warmup + steps) examples; step k uses examples[k * P:(k + 1) * P]."""
    prompts: list[str]
    """Their prompt texts, as cptlab's GRPO renders them (TRL receives these strings)."""
    tokenizer: object
    style: str
    device: torch.device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summarise(name: str, a, begin: list[float], end: list[float], tokens: list[float], device: torch.device) -> dict:
    """Timed window: start of the first step after the warm-up to the end of the last step."""
    timed = len(end) - a.warmup_steps
    seconds = end[-1] - begin[a.warmup_steps]
    timed_tokens = sum(tokens[a.warmup_steps:])
    return dict(variant=name, generation=GENERATION[name], steps=timed, seconds=seconds,
                steps_per_second=timed / seconds, tokens_per_second=timed_tokens / seconds,
                mean_completion_length=timed_tokens / (timed * a.prompts * a.group_size),
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------- cptlab
def run_cptlab(name: str, a, w: Workload) -> dict:
    from cptlab.methods import GRPO, MethodContext
    from cptlab.optim import make_optimizer
    from cptlab.rollout import make_generator
    from cptlab.trainer import _backward, _step

    P, G, C = a.prompts, a.group_size, a.max_new_tokens
    cfg = load_config("tiny", [
        f"rollout.group_size={G}", f"rollout.max_new_tokens={C}", f"rollout.batch_size={max(256, P * G)}",
        f"rollout.engine={name.split(':')[1]}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        f"method.prompts_per_step={P}", f"method.lr={a.lr}", "method.track_base_kl=false",
        "method.updates_per_batch=1", "method.micro_batch_size=0", "method.grad_clip=1.0",
        "method.grpo.beta=0.0", "method.grpo.loss_type=grpo", "method.grpo.scale_rewards=true",
        f"model.dtype={'auto' if a.weights_dtype == 'float32' else a.weights_dtype}"])
    model, tok = load_model(str(w.model_dir), cfg.model, w.device)
    model.train()
    method = GRPO(cfg.method, MethodContext(tok, cfg.prompt, cfg.rollout, w.device, base=None), model)
    # stop only at the unreachable EOS, as TRL does: a sampled pad is then an ordinary token on both sides
    method.sampling = replace(method.sampling, stop_ids=(tok.eos_token_id,))
    optimizer = make_optimizer(model, cfg.method.lr, 0.0)
    begin, end, tokens = [], [], []
    for step in range(a.warmup_steps + a.steps):
        sync(w.device)
        begin.append(time.perf_counter())
        batch = method.make_batch(model, w.examples[step * P:(step + 1) * P], make_generator(step, w.device))
        _step(model, optimizer, lambda: _backward(method, model, batch, cfg.method.micro_batch_size),
              cfg.method.grad_clip)
        sync(w.device)
        end.append(time.perf_counter())
        tokens.append(float(batch.rollout.completion_mask.sum()))
    return summarise(name, a, begin, end, tokens, w.device)


# ---------------------------------------------------------------------------------------------- TRL
def trl_config(name: str, a, out_dir: str, device: torch.device):
    from trl import GRPOConfig

    P, G = a.prompts, a.group_size
    cuda = device.type == "cuda"
    # transformers 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    generation = {
        "trl:default": {},
        "trl:static": {"cache_implementation": "static"},
        "trl:static_compile": {"cache_implementation": "static", "pad_to_multiple_of": 32},
        "trl:paged": {"use_transformers_continuous_batching": True},
    }[name]
    return GRPOConfig(
        output_dir=out_dir, seed=0, report_to=[], disable_tqdm=True, save_strategy="no",
        logging_steps=a.warmup_steps + a.steps, max_steps=a.warmup_steps + a.steps,
        use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, **{checkpointing: False},
        # batch: P prompts x G completions per optimizer step, one generation batch per step
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G, shuffle_dataset=False,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        # loss: as cptlab's GRPO defaults
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        # optimizer: as cptlab.optim.make_optimizer (TRL keeps its fused AdamW implementation)
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0,
        model_init_kwargs={"dtype": a.weights_dtype}, **generation)


def run_trl(name: str, a, w: Workload) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    tokens: list[float] = []

    def verifier_reward(completions, index, completion_ids, **kwargs):
        """cptlab's verifier, as cptlab's GRPO scores (TRL passes the dataset's `index` column along)."""
        tokens.append(float(sum(len(ids) for ids in completion_ids)))
        return [verify(w.examples[i], text, w.style).reward for i, text in zip(index, completions)]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            sync(w.device)
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync(w.device)
            self.end.append(time.perf_counter())

    clock = StepClock()
    dataset = Dataset.from_list([{"prompt": text, "index": i} for i, text in enumerate(w.prompts)])
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(model=str(w.model_dir), reward_funcs=verifier_reward,
                              args=trl_config(name, a, out_dir, w.device), train_dataset=dataset,
                              processing_class=w.tokenizer, callbacks=[clock])
        if name == "trl:static_compile":
            trainer.generation_config.disable_compile = False  # TRL turns transformers' auto-compile off
        trainer.train()
    del trainer
    return summarise(name, a, clock.begin, clock.end, tokens, w.device)


# ---------------------------------------------------------------------------------------------- main
def versions() -> dict:
    import transformers

    out = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def ratios_of(rows: list[dict]) -> dict[str, float]:
    """steps/s of every cptlab variant over every TRL variant, and best over best."""
    ok = {r["variant"]: r["steps_per_second"] for r in rows if "error" not in r}
    cptlab = {k: v for k, v in ok.items() if k.startswith("cptlab")}
    trl = {k: v for k, v in ok.items() if k.startswith("trl")}
    out = {f"{c} / {t}": cv / tv for c, cv in cptlab.items() for t, tv in trl.items()}
    if cptlab and trl:
        best_c, best_t = max(cptlab, key=cptlab.get), max(trl, key=trl.get)
        out[f"best cptlab ({best_c}) / best TRL ({best_t})"] = cptlab[best_c] / trl[best_t]
    return out


def print_table(rows: list[dict], ratios: dict) -> None:
    print(f"\n{'variant':20s} {'generation':52s} {'steps/s':>8s} {'s/step':>7s} {'tok/s':>9s} {'len':>6s} "
          f"{'peak GiB':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:20s} {r['generation']:52s} error: {r['error']}")
            continue
        mem = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else f"{'-':>8s}"
        print(f"{r['variant']:20s} {r['generation']:52s} {r['steps_per_second']:8.3f} {1 / r['steps_per_second']:7.3f} "
              f"{r['tokens_per_second']:9.0f} {r['mean_completion_length']:6.1f} {mem}")
    if ratios:
        print("\nsteps/s ratios (cptlab / TRL):")
        for k, v in ratios.items():
            print(f"  {k:52s} {v:6.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="random-init model to build")
    p.add_argument("--model-dir", help="use this HF model directory instead of building one")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before them")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="C: completion length")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--domain", default="gcd", help="cptlab task domain the prompts come from")
    p.add_argument("--variants", default="all", help="comma list of " + ",".join(GENERATION))
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype both sides store and optimise the weights in (TRL's static cache needs bfloat16 "
                        "weights: with float32 weights under autocast its cache and keys disagree)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, seen through TRL
    device = resolve_device(a.device)
    names = list(GENERATION) if a.variants == "all" else a.variants.split(",")
    unknown = [n for n in names if n not in GENERATION]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(GENERATION)}")
    if device.type != "cuda" and "trl:static_compile" in names:
        names.remove("trl:static_compile")
        print("trl:static_compile skipped: transformers compiles generation on accelerators only")

    examples = make_split(a.domain, "train", a.prompts * (a.warmup_steps + a.steps), seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else build_model_dir(a.size, Path(tmp) / "model")
        model, tok = load_model(str(model_dir), ModelConfig(), torch.device("cpu"))  # as cptlab loads it
        prompt_cfg = load_config("tiny").prompt
        w = Workload(model_dir, examples, [student_prompt(prompt_cfg, ex.question, tok) for ex in examples], tok,
                     prompt_cfg.style, device)
        print(f"model {a.model_dir or a.size}: {count_parameters(model) / 1e6:.1f}M parameters; {a.prompts} prompts x "
              f"{a.group_size} completions x {a.max_new_tokens} tokens per step on {device}", flush=True)
        del model
        for name in names:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run = run_cptlab if name.startswith("cptlab") else run_trl
            try:
                rows.append(run(name, a, w))
            except Exception as e:  # one failing variant (e.g. an optional TRL path) should not lose the others
                error = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(dict(variant=name, generation=GENERATION[name], error=error))
            gc.collect()
            print(json.dumps(rows[-1]), flush=True)
    ratios = ratios_of(rows)
    print_table(rows, ratios)
    if a.out:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
        result = dict(config=dict(vars(a), device=str(device), completions_per_step=a.prompts * a.group_size),
                      device_name=device_name, versions=versions(), results=rows, ratios=ratios)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
