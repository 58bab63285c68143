from importlib import resources

import pytest
import yaml

from cptlab.config import (Config, MethodConfig, apply_overrides, eval_domains, from_dict, load_config, load_source,
                           preset_names, stage_method, to_dict)
from cptlab.errors import ConfigError, UserError
from cptlab.tasks import builtin_domain_names


def _shipped_data_missing(err: ConfigError) -> str | None:
    """The file a `cptlab:NAME` data-set source names, when the error is only that it is not there."""
    if not (isinstance(err, ConfigError) and err.field.startswith("domains.")
            and err.field.endswith(("source", "eval_source")) and str(err.value).startswith("cptlab:")):
        return None
    path = resources.files("cptlab") / "data" / str(err.value)[len("cptlab:"):]
    return None if path.is_file() or path.is_dir() else str(path)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_to_a_config_that_round_trips_and_names_known_domains(name):
    if name == "paper":
        pytest.skip("reads data sets the user downloads (tests/test_datasets.py writes them and loads it)")
    try:
        cfg = load_config(name)
    except ConfigError as err:
        missing = _shipped_data_missing(err)
        if name.startswith("paper_kinds") and missing:
            pytest.skip(f"preset {name} reads {missing}, a data file not in this checkout yet")
        raise
    assert len(cfg.stages) >= 1 and all(stage.steps >= 1 for stage in cfg.stages)
    known = set(builtin_domain_names()) | set(cfg.domains)
    assert {stage.domain for stage in cfg.stages} <= known
    assert set(eval_domains(cfg)) <= known and len(eval_domains(cfg)) >= 1
    assert set(cfg.warmup.domains) <= known
    assert from_dict(Config, to_dict(cfg)) == cfg  # what a run directory's config.yaml reads back to


def test_presets_include_the_default_and_the_ci_one():
    assert {"tiny", "smoke"} <= set(preset_names())


def test_default_is_tiny():
    """No preset named: presets/tiny.yaml, whose values are not the dataclass defaults."""
    assert load_config(None) == load_config("tiny")
    raw = yaml.safe_load((resources.files("cptlab") / "presets" / "tiny.yaml").read_text())
    assert raw.pop("description") and load_source(None) == raw  # the description is for `cptlab presets` only
    cfg = load_config(None)
    assert [(s.domain, s.steps) for s in cfg.stages] == [("reversal", 100), ("filtering", 80), ("sorting", 80)]
    assert cfg.method.lr == 1e-4 and cfg.method.lr != MethodConfig().lr
    assert cfg.run.name == "tiny"


def test_dotted_overrides_typed():
    cfg = load_config("tiny", ["method.name=sdpo", "method.sdpo.ema_rate=0.1", "rollout.group_size=4",
                               "eval.domains=[arithmetic,sorting]", "model.path=null"])
    assert cfg.method.name == "sdpo" and cfg.method.sdpo.teacher.ema.rate == 0.1
    assert cfg.rollout.group_size == 4 and cfg.eval.domains == ["arithmetic", "sorting"]
    assert cfg.model.path is None


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config("tiny", ["method.lr=1"]).method.lr == 1.0
    assert load_config("tiny", ["method.lr=5e-5"]).method.lr == 5e-5  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="method.lr"):
        load_config("tiny", ["method.lr=fast"])
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config("tiny", ["rollout.group_size=true"])


@pytest.mark.parametrize("override, field", [
    ("model.hiden_size=3", "model.hiden_size"),
    ("rollout.group_size=abc", "rollout.group_size"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("method.sdpo.ema_rate=1.5", "method.sdpo.teacher.ema.rate (method.sdpo.ema_rate)"),
    ("method.sdpo.teacher.ema.rate=1.5", "method.sdpo.teacher.ema.rate (method.sdpo.ema_rate)"),
    ("method.name=ppo", "method.name"),
    ("eval.domains=[nosuchdomain]", "eval.domains[0]"),
    ("method.sdpo.teacher_mode=average", "method.sdpo.teacher.mode (method.sdpo.teacher_mode)"),
    ("method.sdpo.stable_gamma=1.2", "method.sdpo.teacher.stable.gamma (method.sdpo.stable_gamma)"),
    ("method.sdpo.stable_anchor=previous", "method.sdpo.teacher.stable.anchor (method.sdpo.stable_anchor)"),
    ("method.sdpo.stable_restart_every=-1", "method.sdpo.teacher.stable.restart_every (method.sdpo.stable_restart_every)"),
    ("method.sdpo.stable_restart_at=[0.5,1.0]",
     "method.sdpo.teacher.stable.restart_at[1] (method.sdpo.stable_restart_at[1])"),
    ("method.sdpo.stable_restart_at=[.nan]",
     "method.sdpo.teacher.stable.restart_at[0] (method.sdpo.stable_restart_at[0])"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert e.value.field == field
    assert field in str(e.value) and "expected" in str(e.value)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'nosuch'"):  # a preset, not a config field
        load_config("nosuch")


def test_stage_method_overrides_merge():
    cfg = load_config("smoke")
    m = stage_method(cfg, cfg.stages[1], 1)
    assert m.name == "sdpo" and m.sdpo.teacher.mode == "ema" and m.lr == cfg.method.lr


def test_bad_stage_domain_and_method(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  - {domain: nosuch, steps: 2}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.domain"):
        load_config(str(f))
    f.write_text("stages:\n  - {domain: sorting, steps: 2, method: {name: sdpo, sdpo: {alpha: 7}}}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.method\.sdpo\.alpha"):
        load_config(str(f))


def test_override_syntax_errors():
    with pytest.raises(UserError):
        apply_overrides({}, ["novalue"])
    with pytest.raises(UserError):
        apply_overrides({}, ["a..b=1"])


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(f))


def test_run_seeds_share_one_base_model_unless_asked():
    from cptlab.warmup import cache_path

    base = cache_path(load_config("tiny", []))
    assert cache_path(load_config("tiny", ["run.seed=2"])) == base  # a study's seeds share the base
    assert cache_path(load_config("tiny", ["run.seed=2", "warmup.seed=null"])) != base
    assert cache_path(load_config("tiny", ["warmup.seed=1"])) != base


def test_every_config_field_has_a_docstring():
    import dataclasses

    import cptlab.config as C
    import cptlab.config.schema as schema

    classes = [v for v in vars(schema).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and v.__module__ == schema.__name__]
    assert len(classes) >= 12
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not C.field_docs(cls).get(f.name, "").strip()]
    assert missing == []


def test_describe_lists_each_field_with_value_default_and_doc():
    from cptlab.config import describe

    rows = {key: (value, default, doc) for key, value, default, doc in describe(load_config("smoke"))}
    value, default, doc = rows["method.prompts_per_step"]
    assert (value, default) == (4, 16) and "Prompts per rollout batch" in doc
    div = rows["method.sdpo.distillation.divergence"]
    assert div[:2] == ("jsd", "jsd") and "Jensen-Shannon" in div[2]
    assert rows["method.sdpo"][1] is None  # a section's own row


def test_sdpo_alpha_of_older_configs_reads_as_divergence():
    def sdpo(alpha):
        return load_config("smoke", [f"method.sdpo.alpha={alpha}"]).method.sdpo

    assert (sdpo(0.3).distillation.divergence, sdpo(0.3).distillation.jsd_alpha) == ("jsd", 0.3)
    assert sdpo(0).distillation.divergence == "forward_kl" and sdpo(1).distillation.divergence == "reverse_kl"
    assert sdpo("null").distillation.divergence == "jsd" and sdpo("null").distillation.jsd_alpha == 0.5
    with pytest.raises(ConfigError, match=r"method\.sdpo\.distillation\.jsd_alpha \(method\.sdpo\.jsd_alpha\).*forward_kl"):
        load_config("smoke", ["method.sdpo.jsd_alpha=0"])
    with pytest.raises(ConfigError, match=r"method\.sdpo\.distillation\.divergence.*sampled_token"):
        load_config("smoke", ["method.sdpo.distillation=sampled_token"])
    assert load_config("smoke", ["method.sdpo.distillation.kind=sampled_token",
                                 "method.sdpo.distillation.divergence=reverse_kl"]).method.sdpo.distillation.kind \
        == "sampled_token"


def test_flat_sdpo_spelling_of_older_configs_reads_as_the_nested_one():
    """A run's config.yaml written before the SDPO section was nested loads to the same config."""
    from cptlab.config import Config, from_dict, to_dict

    flat = {"teacher_mode": "stable", "ema_rate": 0.2, "mix_coef": 0.1, "frozen_source": "base", "stable_gamma": 0.3,
            "stable_anchor": "stage_start", "stable_restart_every": 5, "stable_restart_at": [0.5],
            "distillation": "logits", "divergence": "reverse_kl", "jsd_alpha": 0.4, "top_k": None, "demo_source":
            "reference", "feedback_max_chars": 100, "no_demo": "skip", "blend_lambda": 0.2}
    nested = {"teacher": {"mode": "stable", "ema": {"rate": 0.2, "source": "base"}, "frozen": {"source": "base"},
                          "trust_region": {"mix_coef": 0.1, "source": "base"},
                          "stable": {"gamma": 0.3, "anchor": "stage_start", "restart_every": 5, "restart_at": [0.5]}},
              "distillation": {"kind": "logits", "divergence": "reverse_kl", "jsd_alpha": 0.4, "top_k": None},
              "reprompt": {"demo_source": "reference", "feedback_max_chars": 100, "no_demo": "skip"},
              "blend_lambda": 0.2}
    old = from_dict(Config, {"method": {"name": "sdpo", "sdpo": flat}, "stages": [{"domain": "gcd"}]})
    new = from_dict(Config, {"method": {"name": "sdpo", "sdpo": nested}, "stages": [{"domain": "gcd"}]})
    assert old == new and from_dict(Config, to_dict(new)) == new
    # a flat key given after a nested section (a dotted override) wins
    cfg = load_config("smoke", ["method.sdpo.teacher.mode=frozen", "method.sdpo.teacher_mode=current"])
    assert cfg.method.sdpo.teacher.mode == "current"


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "gspo"])
def test_registered_loss_types_resolve_and_unknown_ones_are_refused(loss_type):
    cfg = load_config("smoke", [f"method.grpo.loss_type={loss_type}", "method.grpo.cispo_max_ratio=2"])
    assert cfg.method.grpo.loss_type == loss_type and cfg.method.grpo.cispo_max_ratio == 2.0
    with pytest.raises(ConfigError, match="stages\\[1\\].method.grpo.loss_type"):
        load_config("smoke", ["stages=[{domain: gcd, steps: 1}, {domain: gcd, steps: 1, method: {grpo: {loss_type: x}}}]"])
    # TRL's spelling, method.loss_type, is the same field, at the run's level and in a stage's method
    trl = load_config("smoke", [f"method.loss_type={loss_type}", "method.grpo.clip_eps=0.1",
                                "stages=[{domain: gcd, steps: 1}, {domain: gcd, steps: 1, method: {loss_type: bnpo}}]"])
    assert trl.method.grpo.loss_type == loss_type and trl.method.grpo.clip_eps == 0.1
    assert stage_method(trl, trl.stages[1], 1).grpo.loss_type == "bnpo"
    with pytest.raises(ConfigError, match="method.grpo.loss_type"):
        load_config("smoke", ["method.loss_type=x"])


def test_settings_of_a_method_section_no_stage_reads_are_refused():
    with pytest.raises(ConfigError, match=r"'method.sdpo.teacher.ema.rate \(method.sdpo.ema_rate\)' = 0.1: .*no stage "
                                          r"reads the sdpo section"):
        load_config("tiny", ["method.sdpo.ema_rate=0.1"])  # three GRPO stages
    with pytest.raises(ConfigError, match=r"stages\[0\].method.grpo.beta"):
        load_config("tiny", ["stages=[{domain: gcd, steps: 1, method: {name: sdpo, grpo: {beta: 0.1}}}]"])
    blend = load_config("tiny", ["stages=[{domain: gcd, steps: 1, method: {name: sdpo, sdpo: {blend_lambda: 0.5}, "
                                 "grpo: {beta: 0.1}}}]"])  # a blending SDPO stage reads grpo too
    assert blend.stages[0].method["grpo"]["beta"] == 0.1
    assert load_config("smoke", ["method.sdpo.ema_rate=0.1"]).method.sdpo.teacher.ema.rate == 0.1  # stage 2 is SDPO
    with pytest.raises(ConfigError, match=r"teacher.stable.gamma.*no setting of teacher mode stable"):
        load_config("smoke", ["method.sdpo.teacher.stable.gamma=0.1"])  # its SDPO stage's teacher is an EMA


def test_resolve_fills_every_config_level_auto_and_null_and_changes_nothing_else():
    import dataclasses

    from cptlab.config import MODEL_DEPENDENT, resolve

    cfg = load_config("smoke", ["eval.temperature=null", "eval.max_new_tokens=null", "eval.save_samples=null",
                                "warmup.seed=null", "run.seed=7", "run.device=auto", "eval.general_probe=auto"])
    before = to_dict(cfg)
    out = resolve(cfg, cuda_available=False)
    assert to_dict(cfg) == before  # the argument is not changed
    assert (out.eval.temperature, out.eval.max_new_tokens) == (cfg.rollout.temperature, cfg.rollout.max_new_tokens)
    assert out.eval.save_samples == 4 and out.eval.general_probe is False  # the built tiny model
    assert out.warmup.seed == 7 and out.run.device == "cpu"
    assert resolve(cfg, cuda_available=True).run.device == "cuda"
    assert to_dict(resolve(out, cuda_available=False)) == to_dict(out)  # resolving twice gives the same
    # what remains 'auto' is only what the built model decides
    flat = {f"{section}.{k}": v for section, values in to_dict(out).items() if isinstance(values, dict)
            for k, v in values.items()}
    left = {k for k, v in flat.items() if v == "auto" or (v is None and not k.startswith("model.path"))}
    assert left <= set(MODEL_DEPENDENT) | {"model.path"}, left
    changed = {k for k, v in flat.items() if v != {f"{s}.{k2}": v2 for s, vs in before.items() if isinstance(vs, dict)
                                                    for k2, v2 in vs.items()}.get(k)}
    assert changed == {"eval.temperature", "eval.max_new_tokens", "eval.save_samples", "eval.general_probe",
                       "warmup.seed", "run.device"}
    assert dataclasses.is_dataclass(out) and out is not cfg
