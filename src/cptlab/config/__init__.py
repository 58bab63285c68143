"""Typed configuration: one dataclass per concern (schema.py), built from YAML presets and dotted
overrides (load.py, build.py), checked (validate.py) and resolved for a run (resolve.py).

Every field has its default in schema.py, next to its meaning. `load_config` is the entry point for
fresh input: preset or YAML file -> dotted `key.sub=value` overrides -> typed dataclasses ->
validation. Anything wrong raises `ConfigError` naming the field, the value and what was expected.
"""

from ..errors import ConfigError, UserError
from .build import deep_merge, from_dict, to_dict
from .describe import describe, field_docs
from .load import (absolute_sources, apply_overrides, load_config, load_run_config, load_source, parse_override,
                   preset_description, preset_names, read_yaml)
from .resolve import MODEL_DEPENDENT, eval_domains, general_probe_enabled, resolve, resolve_eval, stage_method
from .schema import (Config, DistillationConfig, DistributedConfig, DomainSpec, EMATeacherConfig, EvalConfig,
                     FrozenTeacherConfig, GRPOConfig, LoraConfig, MethodConfig, ModelConfig, PromptConfig,
                     RepromptConfig, RolloutConfig, RunSettings, SDPOConfig, StableEMATeacherConfig,
                     StableTeacherConfig, StageConfig, TeacherConfig, TrustRegionTeacherConfig, WarmupConfig)
from .validate import TEMPLATE_SLOTS, refuse_unused_settings, validate

__all__ = ["ConfigError", "UserError", "deep_merge", "from_dict", "to_dict", "describe", "field_docs",
           "absolute_sources", "apply_overrides", "load_config", "load_run_config", "load_source", "parse_override",
           "preset_description", "preset_names", "read_yaml", "eval_domains", "general_probe_enabled", "resolve",
           "MODEL_DEPENDENT", "resolve_eval", "stage_method", "Config",
           "DistributedConfig", "DomainSpec", "EvalConfig", "GRPOConfig", "LoraConfig", "MethodConfig", "ModelConfig",
           "PromptConfig", "RolloutConfig", "RunSettings", "SDPOConfig", "StageConfig", "WarmupConfig",
           "DistillationConfig", "TeacherConfig", "RepromptConfig", "EMATeacherConfig", "FrozenTeacherConfig",
           "TrustRegionTeacherConfig", "StableTeacherConfig", "StableEMATeacherConfig",
           "TEMPLATE_SLOTS", "refuse_unused_settings", "validate"]
