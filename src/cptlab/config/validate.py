"""Range checks and refusals: every problem is a ConfigError naming the field, the value and what was
expected. `validate` checks any config (a run's own config.yaml too); `refuse_unused_settings` only
fresh input (load_config)."""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

from ..errors import ConfigError
from .build import to_dict, with_older_spelling
from .resolve import stage_method
from .schema import Config, MethodConfig


def _check(ok: bool, field: str, value: Any, expected: str, choices=None) -> None:
    """ConfigError unless ok; `choices`: the known names `value` should be one of (suggests the closest)."""
    if not ok:
        raise ConfigError(with_older_spelling(field), value, expected, choices=choices)



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
    from ..methods import METHODS

    _check(m.name in METHODS, f"{where}.name", m.name, "a registered method (one of " + ", ".join(METHODS) + ")",
           METHODS)
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
    from ..losses import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    _check(g.advantage in ADVANTAGE_ESTIMATORS, f"{where}.grpo.advantage", g.advantage,
           "a registered advantage estimator (one of " + ", ".join(ADVANTAGE_ESTIMATORS) + ")", ADVANTAGE_ESTIMATORS)
    _check(g.loss_type in POLICY_LOSSES, f"{where}.grpo.loss_type", g.loss_type,
           "a registered policy loss (one of " + ", ".join(POLICY_LOSSES) + ")", POLICY_LOSSES)
    _check(g.cispo_max_ratio > 0, f"{where}.grpo.cispo_max_ratio", g.cispo_max_ratio, "a positive cap")
    d, t, r = s.distillation, s.teacher, s.reprompt
    w = f"{where}.sdpo"
    _check(0 < d.jsd_alpha < 1, f"{w}.distillation.jsd_alpha", d.jsd_alpha,
           "a value in (0, 1) (for 0 or 1 use divergence=forward_kl or reverse_kl)")
    _check(d.kind == "logits" or d.divergence == "reverse_kl", f"{w}.distillation.divergence", d.divergence,
           "reverse_kl with distillation.kind=sampled_token (the sampled-token loss estimates only the reverse KL)")
    _check(d.top_k is None or d.top_k >= 1, f"{w}.distillation.top_k", d.top_k, "an integer >= 1 or null")
    _check(d.is_clip is None or d.is_clip > 0, f"{w}.distillation.is_clip", d.is_clip, "a positive value or null")
    _check(d.temperature > 0, f"{w}.distillation.temperature", d.temperature, "a positive temperature")
    _check(r.feedback_max_chars >= 20, f"{w}.reprompt.feedback_max_chars", r.feedback_max_chars, "an integer >= 20")
    from ..teacher import TEACHERS

    _check(t.mode in TEACHERS, f"{w}.teacher.mode", t.mode, "a registered teacher (one of " + ", ".join(TEACHERS) + ")",
           TEACHERS)
    for name, rate in (("ema", t.ema.rate), ("stable_ema", t.stable_ema.rate)):
        _check(0 <= rate <= 1, f"{w}.teacher.{name}.rate", rate, "a value in [0, 1]")
    _check(0 <= t.trust_region.mix_coef <= 1, f"{w}.teacher.trust_region.mix_coef", t.trust_region.mix_coef,
           "a value in [0, 1]")
    _check(0 <= s.blend_lambda <= 1, f"{w}.blend_lambda", s.blend_lambda, "a value in [0, 1]")
    for name, gamma in (("stable", t.stable.gamma), ("stable_ema", t.stable_ema.gamma)):
        _check(0 <= gamma <= 1, f"{w}.teacher.{name}.gamma", gamma, "a value in [0, 1]")
    _check(t.stable.restart_every >= 0, f"{w}.teacher.stable.restart_every", t.stable.restart_every,
           "an integer >= 0 (0: never)")
    for i, f in enumerate(t.stable.restart_at):
        _check(0 < f < 1, f"{w}.teacher.stable.restart_at[{i}]", f, "a fraction of the stage in (0, 1)")


def validate(cfg: Config) -> None:
    """Range checks, domain names against the config's own domains (built-in + its `domains` section:
    tasks.domain_registry); changes nothing outside `cfg`."""
    from ..tasks import check_domain, domain_registry, train_pool_size
    from ..tasks.answer import RUN_FORMATS

    domains = domain_registry(cfg.domains)
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
    from ..trackers import check_names

    check_names(cfg.run.report_to)
    _check(bool(cfg.run.tracker_project), "run.tracker_project", cfg.run.tracker_project, "a non-empty project name")
    _check(cfg.distributed.bucket_mb >= 0, "distributed.bucket_mb", cfg.distributed.bucket_mb, "a size >= 0 (0: no buckets)")
    if cfg.distributed.strategy == "fsdp":
        _check(m.lora.rank == 0, "model.lora.rank", m.lora.rank, "0 with distributed.strategy=fsdp (LoRA is not sharded)")
        _check(r.engine != "plain", "rollout.engine", r.engine,
               "'fast' or 'auto' with distributed.strategy=fsdp (rollouts sample from the fast engine's gathered weights)")
    for i, d in enumerate(w.domains):
        check_domain(d, f"warmup.domains[{i}]", domains)
        _check(not w.enabled or train_pool_size(d, 1, domains) > 0, f"warmup.domains[{i}]", d,
               "a domain with training rows (this data set has only an eval_source)")
    for i, d in enumerate(e.domains):
        if d != "all":
            check_domain(d, f"eval.domains[{i}]", domains)
    _validate_method(cfg.method, "method")
    if cfg.model.path and w.pretrained and w.enabled:
        stage_domains = {stage.domain for stage in cfg.stages}
        overlap = [d for d in w.domains if d in stage_domains]
        _check(not overlap, "warmup.domains", w.domains,
               f"no stage domain in a pretrained model's format warm-up (found {', '.join(overlap)})")
        _check(len(w.domains) >= 1, "warmup.domains", w.domains, "a non-empty list (warmup.pretrained is true)")
    _check(len(cfg.stages) >= 1, "stages", cfg.stages, "a non-empty list of stages, e.g. [{domain: gcd, steps: 50}]")
    for i, stage in enumerate(cfg.stages):
        check_domain(stage.domain, f"stages[{i}].domain", domains)
        _check(stage.steps == 0 or train_pool_size(stage.domain, 1, domains) > 0, f"stages[{i}].domain", stage.domain,
               "a domain with training rows (this data set has only an eval_source)")
        _check(stage.steps >= 0, f"stages[{i}].steps", stage.steps, "an integer >= 0")
        _validate_method(stage_method(cfg, stage, i), f"stages[{i}].method")


def _dotted(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists are values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for k, v in data.items():
        out.update(_dotted(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def refuse_unused_settings(cfg: Config) -> None:
    """A setting that nothing reads must not be given: a method section (method.grpo, method.sdpo) that
    no stage's method reads, or the settings of a teacher mode (method.sdpo.teacher.<mode>) that no SDPO
    stage uses. Otherwise it would be silently ignored. ConfigError naming the first such field."""
    from ..methods import METHODS
    from .build import upgrade_flat_sdpo

    merged = [stage_method(cfg, stage, i) for i, stage in enumerate(cfg.stages)]
    used = {section for m in merged for section in METHODS[m.name].sections(m)}
    modes = {m.sdpo.teacher.mode for m in merged if "sdpo" in METHODS[m.name].sections(m)}
    names = ", ".join(sorted({m.name for m in merged}))
    default = _dotted(to_dict(MethodConfig()))
    places = [("method", {k: v for k, v in _dotted(to_dict(cfg.method)).items() if v != default.get(k)})]
    for i, stage in enumerate(cfg.stages):
        over = dict(stage.method)
        if isinstance(over.get("sdpo"), dict):
            over["sdpo"] = upgrade_flat_sdpo(over["sdpo"], f"stages[{i}].method.sdpo")
        places.append((f"stages[{i}].method", _dotted(over)))
    for where, changed in places:
        for key, value in changed.items():
            section, _, rest = key.partition(".")
            if section in ("grpo", "sdpo") and section not in used:
                raise ConfigError(with_older_spelling(f"{where}.{key}"), value, f"no {section} setting, since no stage reads the "
                                  f"{section} section (the stages use {names}); drop it or train a stage with a "
                                  "method that reads it")
            parts = rest.split(".")
            if section == "sdpo" and parts[0] == "teacher" and len(parts) > 2 and parts[1] not in modes:
                raise ConfigError(with_older_spelling(f"{where}.{key}"), value, f"no setting of teacher mode {parts[1]}, since no SDPO "
                                  f"stage uses it (teacher.mode: {', '.join(sorted(modes))})")
