"""cptlab vs TRL: the same GRPO step in TRL's GRPOTrainer, or the same SDPO step in TRL's SDPOTrainer,
and in cptlab, side by side in one process (issue: bench_vs_trl; SDPO: the speed issue).

    python benchmarks/bench_vs_trl.py [--method grpo|sdpo] [--size tiny|gpu | --model-dir DIR] [--device auto]
        [--steps 5] [--warmup-steps 2] [--prompts 8] [--group-size 8] [--max-new-tokens 64] [--lr 1e-5]
        [--variants all | cptlab:fast,trl:default,...] [--out results.json]
    python benchmarks/bench_vs_trl.py --check [--prompts 4 --group-size 4 --max-new-tokens 16]

TRL is not a cptlab dependency: install it into the benchmark's environment from
benchmarks/trl_requirements.txt (that file says how, also for a machine without network).

GRPO. One step, on both sides, is: sample G completions for each of P prompts (at most C new tokens,
temperature 1), score them with cptlab's verifier, group-normalised advantages, the clipped policy
gradient loss ("grpo" aggregation, beta = 0 so no reference model, one update per batch so no old
log-prob pass), backward over the whole batch, gradient clipping at 1.0 and one AdamW step (betas
0.9/0.99, eps 1e-8, no weight decay, constant lr). Weights are float32 on both sides (--weights-dtype
bfloat16: bf16 on both); on CUDA both run the forwards under bfloat16 autocast (TRL: bf16=True).
Gradient checkpointing, on by default in TRL's config, is off, as it is in cptlab (at these sizes it
only costs time).

SDPO (--method sdpo). One step: the same rollout and reward, then the self-teacher's reprompts (the first
successful sibling other than the sample itself as the demonstration, success = reward >= 1; no
environment feedback on either side: TRL only takes a static per-prompt feedback column, cptlab the
verifier's per-sample text), the student forward on the prompt and the EMA teacher's forward on the
reprompt, the generalised JSD (alpha 0.5) over the student's top-100 tokens plus a tail bucket, the
importance-weight clip 2 (inert on both sides with one update per batch), backward, clip, AdamW, and
the teacher's EMA step (rate 0.05) once per step. Both sides use the same templates: the prompt is
"Q: {question}\nA:", the reprompt that prompt followed by "\nDemo:{demonstration}\nA:". A random-init
model never solves a task, so (for a built model, or with --success-every N) a completion also counts
as a success when crc32(text) % N == 0 (N = 4: about a quarter of the samples), the same rule on both
sides, so that both distil on about the same number of reprompts. The questions of a built model
(character tokenizer) are left-padded with spaces to one prompt length, so that TRL's compiled static
cache sees one prompt shape (SDPOTrainer has no pad_to_multiple_of); both sides render the same strings.

--check (SDPO, CPU): before any timing, that both compute the same loss on the same batch. cptlab samples
one batch and builds its reprompts; TRL's SDPOTrainer.compute_loss gets exactly those tensors (prompt,
completion, teacher context, distillation mask). Printed: the ratio of the losses and of the gradient
norms (a) as each side normalises and positions them, (b) with TRL's forward given the position ids
generation used (TRL's training forward passes none, so a left-padded row's tokens sit at other
positions than when they were sampled) and cptlab's token mean re-weighted to TRL's
mean-of-sequence-means: (b) is ~1 when the per-token maths agree; (a)/(b) is what the remaining
differences cost.

Batch semantics: TRL's per_device_train_batch_size counts completions, so it is P * G here, with
gradient_accumulation_steps = 1 (TRL then generates one batch of P * G per optimizer step, the same as
cptlab's prompts_per_step = P with group_size = G). TRL's dataset is not shuffled, so both sides see
the same prompts in the same order.

Completion length: a built model (--size) gets an end-of-sequence token the model cannot emit (an id
one past its vocabulary), so both sides always generate C tokens per completion (cptlab's completion mask
also leaves out a sampled <pad> token, so its length column reads a little below C). With --model-dir
the model may stop early; the table shows the mean length each side produced.

Variants: cptlab:fast (cptlab's decode engine: static KV cache, CUDA graphs on GPU), cptlab:compiled (the
same with its decode layer compiled by torch.compile, rollout.compile_decode) and cptlab:plain
(transformers.generate); trl:default (TRL's default generation: transformers.generate with a dynamic
cache), trl:static (cache_implementation="static"), trl:static_compile (static cache with the decode
step compiled by transformers; TRL builds its GenerationConfig with disable_compile=True, so this
variant flips it back after constructing the trainer; CUDA only, GRPO prompts padded to a multiple of 32
to keep shapes stable) and trl:paged (GRPO only: use_transformers_continuous_batching=True; TRL casts
the policy to bfloat16 in place for it under bf16). Steps/s is measured
from the start of the first timed step to the end of the last one (the whole loop: data, generation,
reward, loss, backward, optimizer), after --warmup-steps untimed steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from cptlab.config import ModelConfig, load_config
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, load_model, resolve_device, save_model
from cptlab.prompts import student_prompt
from cptlab.tasks import Example, Verdict, make_split, verify

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # SDPOTrainer lives in trl.experimental

SIZES = {
    "tiny": ModelConfig(),  # ~0.7M parameters: the tiny preset's decoder, for CPU
    "gpu": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                       max_positions=512),  # ~76M parameters
}
# every variant the bench knows, and what it generates with (cptlab's first, then TRL's)
GENERATION = {
    "cptlab:fast": "cptlab engine (static KV cache, CUDA graphs on GPU)",
    "cptlab:compiled": "cptlab engine, decode layer compiled (rollout.compile_decode)",
    "cptlab:plain": "transformers.generate",
    "trl:default": "transformers.generate (dynamic cache)",
    "trl:static": 'cache_implementation="static"',
    "trl:static_compile": "static cache + compiled decode",
    "trl:paged": "transformers continuous batching",
}
GRPO_ONLY = ("trl:paged",)
# SDPO's shared settings (the reference defaults): top-k support, tail, JSD alpha, IS clip, EMA rate
TOP_K, ALPHA, IS_CLIP, EMA_RATE = 100, 0.5, 2.0, 0.05
# both sides' prompt and reprompt text (TRL formats {prompt} as the whole student prompt, so the
# demonstration follows it: cptlab's templates are set to give the same strings)
QUESTION_TEMPLATE = "Q: {question}\nA:"
SOLUTION_TEMPLATE = "\nDemo:{solution}\nA:"


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
    """Their prompt texts, as cptlab renders them (TRL receives these strings)."""
    tokenizer: object
    style: str
    device: torch.device
    success_every: int
    """SDPO: a completion also succeeds when crc32(text) % success_every == 0 (0: the verifier alone)."""

    def reward(self, example: Example, text: str) -> Verdict:
        """cptlab's verifier, and the bench's success rule for models that cannot solve anything yet."""
        v = verify(example, text, self.style)
        if v.reward < 1.0 and self.success_every and zlib.crc32(text.encode()) % self.success_every == 0:
            return replace(v, reward=1.0, correct=True)
        return v


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summarise(name: str, a, begin: list[float], end: list[float], tokens: list[float], device: torch.device,
              **extra) -> dict:
    """Timed window: start of the first step after the warm-up to the end of the last step."""
    timed = len(end) - a.warmup_steps
    seconds = end[-1] - begin[a.warmup_steps]
    timed_tokens = sum(tokens[a.warmup_steps:])
    return dict(variant=name, method=a.method, generation=GENERATION[name], steps=timed, seconds=seconds,
                steps_per_second=timed / seconds, tokens_per_second=timed_tokens / seconds,
                mean_completion_length=timed_tokens / (timed * a.prompts * a.group_size),
                step_seconds=[e - b for b, e in zip(begin, end)],
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None, **extra)


# ---------------------------------------------------------------------------------------------- cptlab
def cptlab_config(a, engine: str = "fast"):
    P, G, C = a.prompts, a.group_size, a.max_new_tokens
    common = [
        f"rollout.group_size={G}", f"rollout.max_new_tokens={C}", f"rollout.batch_size={max(256, P * G)}",
        f"rollout.engine={'fast' if engine == 'compiled' else engine}", f"rollout.compile_decode={engine == 'compiled'}",
        "rollout.temperature=1.0", "rollout.top_p=1.0",
        f"method.prompts_per_step={P}", f"method.lr={a.lr}", "method.track_base_kl=false",
        "method.updates_per_batch=1", "method.micro_batch_size=0", "method.grad_clip=1.0",
        "method.grpo.beta=0.0", "method.grpo.loss_type=grpo", "method.grpo.scale_rewards=true",
        f"model.dtype={'auto' if a.weights_dtype == 'float32' else a.weights_dtype}"]
    sdpo = [
        "method.name=sdpo", "method.sdpo.distillation.divergence=jsd", f"method.sdpo.distillation.jsd_alpha={ALPHA}",
        "method.sdpo.distillation.kind=logits", f"method.sdpo.distillation.top_k={TOP_K}",
        "method.sdpo.distillation.top_k_from=student", "method.sdpo.distillation.add_tail=true",
        f"method.sdpo.distillation.is_clip={IS_CLIP}", "method.sdpo.teacher.mode=ema",
        f"method.sdpo.teacher.ema.rate={EMA_RATE}", "method.sdpo.reprompt.demo_source=sibling",
        "method.sdpo.reprompt.demo_content=full", "method.sdpo.reprompt.skip_self_success=true",
        "method.sdpo.reprompt.success_threshold=1.0", "method.sdpo.reprompt.include_feedback=false",
        "method.sdpo.reprompt.no_demo=skip", "method.sdpo.blend_lambda=0.0"]
    cfg = load_config("tiny", common + (sdpo if a.method == "sdpo" else ["method.name=grpo"]))
    if a.method == "sdpo":
        cfg.prompt = replace(cfg.prompt, question_template=QUESTION_TEMPLATE, answer_prefix="",
                             reprompt_template="{prompt}{solution}{feedback}", solution_template=SOLUTION_TEMPLATE)
    return cfg


def cptlab_method(a, w: Workload, model, tok, engine: str = "fast"):
    """cptlab's GRPO or SDPO for this workload, scoring with the workload's reward rule."""
    import cptlab.methods as methods
    from cptlab.methods import MethodContext, build_method

    cfg = cptlab_config(a, engine)
    methods.verify = lambda example, text, style: w.reward(example, text)  # the bench's success rule
    method = build_method(cfg.method, MethodContext(tok, cfg.prompt, cfg.rollout, w.device, base=None), model)
    # stop only at the unreachable EOS, as TRL does: a sampled pad is then an ordinary token on both sides
    method.sampling = replace(method.sampling, stop_ids=(tok.eos_token_id,))
    return cfg, method


def run_cptlab(name: str, a, w: Workload) -> dict:
    from cptlab.engine import engine_for
    from cptlab.models import compute_dtype
    from cptlab.optim import make_optimizer
    from cptlab.rollout import make_generator
    from cptlab.step import train_step

    P = a.prompts
    engine = name.split(":")[1]
    cfg = cptlab_config(a, engine)
    model, tok = load_model(str(w.model_dir), cfg.model, w.device)
    model.train()
    cfg, method = cptlab_method(a, w, model, tok, engine)
    optimizer = make_optimizer(model, cfg.method.lr, 0.0)
    begin, end, tokens, distilled = [], [], [], []
    for step in range(a.warmup_steps + a.steps):
        sync(w.device)
        begin.append(time.perf_counter())
        batch = method.make_batch(model, w.examples[step * P:(step + 1) * P], make_generator(step, w.device))
        train_step(method, model, optimizer, batch, micro_batch_size=cfg.method.micro_batch_size,
                   grad_clip=cfg.method.grad_clip)
        method.after_batch()  # SDPO: the EMA teacher's step
        sync(w.device)
        end.append(time.perf_counter())
        tokens.append(float(batch.rollout.completion_mask.sum()))
        if batch.distill is not None:
            distilled.append(float(batch.distill.mean()))
    extra = {"distilled_fraction": sum(distilled[a.warmup_steps:]) / a.steps} if distilled else {}
    if engine in ("fast", "compiled") and w.device.type == "cuda":
        extra["engine_counts"] = dict(engine_for(model, dtype=compute_dtype(model), device=w.device, cuda_graphs=True,
                                                 compile=engine == "compiled").counts)
    return summarise(name, a, begin, end, tokens, w.device, **extra)


# ---------------------------------------------------------------------------------------------- TRL
def trl_config(name: str, a, out_dir: str, device: torch.device, **over):
    """GRPOConfig or SDPOConfig for the variant (`over` replaces fields, e.g. use_cpu for the check)."""
    if a.method == "sdpo":
        from trl.experimental.sdpo import SDPOConfig as Config
    else:
        from trl import GRPOConfig as Config

    P, G = a.prompts, a.group_size
    cuda = device.type == "cuda"
    # transformers 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in fields(Config)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    generation = {
        "trl:default": {},
        "trl:static": {"cache_implementation": "static"},
        "trl:static_compile": {"cache_implementation": "static"},
        "trl:paged": {"use_transformers_continuous_batching": True},
    }[name]
    if name == "trl:static_compile" and a.method == "grpo":
        generation["pad_to_multiple_of"] = 32
    method = dict(
        # loss: as cptlab's GRPO defaults
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
    )
    if a.method == "sdpo":
        method.update(
            distillation_weight=1.0, distillation_mode="topk_logits", distillation_topk=TOP_K,
            distillation_add_tail=True, distillation_alpha=ALPHA, distillation_is_clip=IS_CLIP,
            teacher_model_kind="ema", teacher_update_rate=EMA_RATE, teacher_sync_steps=1,
            success_reward_threshold=1.0, dont_reprompt_on_self_success=True, use_successful_as_teacher=True,
            include_environment_feedback=False, remove_thinking_from_demonstration=False,
            reprompt_template="{prompt}{solution}{feedback}",
            solution_template=SOLUTION_TEMPLATE.replace("{solution}", "{successful_previous_attempt}"),
            max_prompt_length=None, diagnostics_warning_interval=0)
    kw = dict(
        output_dir=out_dir, seed=0, report_to=[], disable_tqdm=True, save_strategy="no",
        logging_steps=a.warmup_steps + a.steps, max_steps=a.warmup_steps + a.steps,
        use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, **{checkpointing: False},
        # batch: P prompts x G completions per optimizer step, one generation batch per step
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G, shuffle_dataset=False,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        # optimizer: as cptlab.optim.make_optimizer (TRL keeps its fused AdamW implementation)
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0,
        model_init_kwargs={"dtype": a.weights_dtype}, **method, **generation)
    kw.update(over)
    return Config(**kw)


def trl_trainer(name: str, a, w: Workload, out_dir: str, callbacks=(), tokens: list | None = None, **over):
    import pyarrow
    from datasets import Dataset

    def verifier_reward(completions, index, completion_ids, **kwargs):
        """cptlab's verifier (and the SDPO success rule), as cptlab scores (TRL passes the dataset's
        `index` column along)."""
        if tokens is not None:
            tokens.append(float(sum(len(ids) for ids in completion_ids)))
        return [w.reward(w.examples[i], text).reward for i, text in zip(index, completions)]

    if a.method == "sdpo":
        from trl.experimental.sdpo import SDPOTrainer as Trainer
    else:
        from trl import GRPOTrainer as Trainer
    # a fixed fingerprint: datasets' own hashing of a new table fails with some pyarrow/dill pairs
    # (PicklingError on pyarrow's MonthDayNano) once torch is imported
    dataset = Dataset(pyarrow.Table.from_pylist([{"prompt": text, "index": i} for i, text in enumerate(w.prompts)]),
                      fingerprint=f"cptlab-bench-{len(w.prompts)}")
    trainer = Trainer(model=str(w.model_dir), reward_funcs=verifier_reward,
                      args=trl_config(name, a, out_dir, w.device, **over), train_dataset=dataset,
                      processing_class=w.tokenizer, callbacks=list(callbacks))
    if name == "trl:static_compile":
        trainer.generation_config.disable_compile = False  # TRL turns transformers' auto-compile off
    return trainer


def run_trl(name: str, a, w: Workload) -> dict:
    from transformers import TrainerCallback

    tokens: list[float] = []

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
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trl_trainer(name, a, w, out_dir, callbacks=[clock], tokens=tokens)
        trainer.train()
        extra = {}
        if a.method == "sdpo":
            fractions = trainer.teacher_context_builder.last_metrics
            extra["distilled_fraction_last_step"] = fractions.get("self_distillation/reprompt_sample_fraction")
    del trainer
    return summarise(name, a, clock.begin, clock.end, tokens, w.device, **extra)


# ---------------------------------------------------------------------------------------------- check
def _grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def check_sdpo(a, w: Workload) -> dict:
    """The same SDPO batch through cptlab's loss and TRL's SDPOTrainer.compute_loss (CPU, float32)."""
    from cptlab.losses import sdpo_loss
    from cptlab.rollout import make_generator

    cpu = torch.device("cpu")
    cfg = cptlab_config(a)
    model, tok = load_model(str(w.model_dir), cfg.model, cpu)
    model.train()
    cfg, method = cptlab_method(a, w, model, tok)
    batch = method.make_batch(model, w.examples[:a.prompts], make_generator(0, cpu))
    ro = batch.rollout
    inputs = dict(
        prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, completion_ids=ro.completion_ids,
        completion_mask=ro.completion_mask.long(), advantages=torch.zeros(len(batch)),
        teacher_input_ids=torch.cat([batch.teacher_ids, ro.completion_ids], 1),
        teacher_attention_mask=torch.cat([batch.teacher_mask, ro.completion_mask.long()], 1),
        self_distillation_mask=batch.distill)
    # cptlab, as the trainer computes it (one micro-batch, one rank: the term's weight is 1)
    model.zero_grad(set_to_none=True)
    terms, stats = method.loss(model, batch)
    terms["sdpo"].backward()
    cptlab_loss, cptlab_grad = float(terms["sdpo"].detach()), _grad_norm(model)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trl_trainer("trl:default", a, w, out_dir, use_cpu=True, bf16=False)
        trainer.current_gradient_accumulation_steps = 1
        trl_model = trainer.model
        trl_model.train()

        def trl_loss() -> tuple[float, float]:
            trl_model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trl_model, inputs)
            loss.backward()
            return float(loss.detach()), _grad_norm(trl_model)

        shipped = trl_loss()
        forward = trainer._forward_logits

        def positioned(model, input_ids, attention_mask, logits_to_keep):
            """TRL's forward with the position ids generation used (real tokens counted from 0)."""
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=logits_to_keep + 1)
            return out.logits[:, :-1][:, -logits_to_keep:] / trainer.temperature

        trainer._forward_logits = positioned
        aligned = trl_loss()
        trainer._forward_logits = forward
    # cptlab's loss function re-weighted to TRL's normalisation: each distilled sequence's token mean,
    # averaged over all B sequences (sdpo_loss's weighted token mean with weights mask / L_i, times n / B)
    s = cfg.method.sdpo
    mask = ro.completion_mask * batch.distill[:, None]
    lengths = mask.sum(-1, keepdim=True)
    per_seq = torch.where(lengths > 0, mask / lengths.clamp(min=1), torch.zeros_like(mask))
    model.zero_grad(set_to_none=True)
    logits = ro.logits(model)
    teacher_logits = method.teacher.logits(lambda m: ro.logits(m, batch.teacher_ids, batch.teacher_mask))
    loss, _ = sdpo_loss(logits, teacher_logits, per_seq, alpha=s.jsd_alpha, top_k=s.top_k, add_tail=s.add_tail,
                        top_k_from=s.top_k_from)
    loss = loss * float((lengths > 0).sum()) / len(batch)
    loss.backward()
    reweighted = float(loss.detach()), _grad_norm(model)
    padded_rows = int((ro.prompt_mask == 0).any(-1).sum() + (batch.teacher_mask == 0).any(-1).sum())
    return dict(
        rows=len(batch), distilled_rows=int(batch.distill.sum()), completion_width=ro.completion_ids.shape[1],
        left_padded_prompt_and_reprompt_rows=padded_rows,
        cptlab=dict(loss=cptlab_loss, grad_norm=cptlab_grad),
        cptlab_at_trl_normalisation=dict(loss=reweighted[0], grad_norm=reweighted[1]),
        trl_as_shipped=dict(loss=shipped[0], grad_norm=shipped[1]),
        trl_with_generation_positions=dict(loss=aligned[0], grad_norm=aligned[1]),
        ratio_same_maths=dict(loss=reweighted[0] / aligned[0], grad_norm=reweighted[1] / aligned[1]),
        ratio_as_each_side_runs=dict(loss=cptlab_loss / shipped[0], grad_norm=cptlab_grad / shipped[1]),
        ratio_positions_only=dict(loss=aligned[0] / shipped[0], grad_norm=aligned[1] / shipped[1]),
    )


def print_check(r: dict) -> None:
    print(f"\nSDPO loss check on one batch: {r['rows']} rows, {r['distilled_rows']} distilled, completion width "
          f"{r['completion_width']}, {r['left_padded_prompt_and_reprompt_rows']} left-padded prompt/reprompt rows")
    for key in ("cptlab", "cptlab_at_trl_normalisation", "trl_as_shipped", "trl_with_generation_positions"):
        print(f"  {key:34s} loss {r[key]['loss']:.8f}  grad norm {r[key]['grad_norm']:.8f}")
    for key, what in (("ratio_same_maths", "same maths (cptlab re-weighted / TRL with generation positions)"),
                      ("ratio_as_each_side_runs", "as each side runs (cptlab / TRL as shipped)"),
                      ("ratio_positions_only", "TRL's positions (with generation positions / as shipped)")):
        print(f"  {what:66s} loss {r[key]['loss']:.6f}  grad {r[key]['grad_norm']:.6f}")


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


def make_workload(a, model_dir: Path, device: torch.device) -> Workload:
    examples = make_split(a.domain, "train", a.prompts * (a.warmup_steps + a.steps), seed=0)
    _, tok = load_model(str(model_dir), ModelConfig(), torch.device("cpu"))  # as cptlab loads it
    cfg = cptlab_config(a)
    prompts = [student_prompt(cfg.prompt, ex.question, tok) for ex in examples]
    built = not a.model_dir
    if a.method == "sdpo" and built:  # one prompt length (character tokenizer: one token per character)
        width = max(len(p) for p in prompts)  # questions padded, so that cptlab renders the same strings
        examples = [replace(ex, question=" " * (width - len(p)) + ex.question) for ex, p in zip(examples, prompts)]
        prompts = [student_prompt(cfg.prompt, ex.question, tok) for ex in examples]
    success_every = a.success_every if a.success_every is not None else (4 if built and a.method == "sdpo" else 0)
    return Workload(model_dir, examples, prompts, tok, cfg.prompt.style, device, success_every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["grpo", "sdpo"], default="grpo")
    p.add_argument("--check", action="store_true", help="SDPO: compare both sides' loss on one batch (CPU) and exit")
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
    p.add_argument("--success-every", type=int, default=None,
                   help="SDPO: a completion also succeeds when crc32(text) %% N == 0 (default 4 for a built "
                        "model, 0 = the verifier alone for --model-dir)")
    p.add_argument("--variants", default="all", help="comma list of " + ",".join(GENERATION))
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype both sides store and optimise the weights in (TRL's static cache needs bfloat16 "
                        "weights: with float32 weights under autocast its cache and keys disagree)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, seen through TRL
    if a.check:
        a.method, a.weights_dtype = "sdpo", "float32"
    device = torch.device("cpu") if a.check else resolve_device(a.device)
    names = list(GENERATION) if a.variants == "all" else a.variants.split(",")
    unknown = [n for n in names if n not in GENERATION]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(GENERATION)}")
    if a.method == "sdpo":
        names = [n for n in names if n not in GRPO_ONLY]
    if device.type != "cuda" and "trl:static_compile" in names:
        names.remove("trl:static_compile")
        print("trl:static_compile skipped: transformers compiles generation on accelerators only")

    rows, ratios, check = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else build_model_dir(a.size, Path(tmp) / "model")
        w = make_workload(a, model_dir, device)
        model, _ = load_model(str(model_dir), ModelConfig(), torch.device("cpu"))
        print(f"{a.method.upper()}: model {a.model_dir or a.size}: {count_parameters(model) / 1e6:.1f}M parameters; "
              f"{a.prompts} prompts x {a.group_size} completions x {a.max_new_tokens} tokens per step on {device}",
              flush=True)
        del model
        if a.check:
            torch.manual_seed(0)
            check = check_sdpo(a, w)
            print_check(check)
        else:
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
                    rows.append(dict(variant=name, method=a.method, generation=GENERATION[name], error=error))
                gc.collect()
                print(json.dumps(rows[-1]), flush=True)
            ratios = ratios_of(rows)
            print_table(rows, ratios)
    if a.out:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
        result = dict(config=dict(vars(a), device=str(device), completions_per_step=a.prompts * a.group_size),
                      device_name=device_name, versions=versions(), results=rows, ratios=ratios, check=check)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
