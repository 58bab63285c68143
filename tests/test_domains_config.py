"""The `domains` config section: new reasoning-gym domains and changed built-in ones, validated,
registered for every part of a run (splits, evaluation, `cptlab domains`, resumed and study child
processes), with train and eval splits still disjoint."""

import json

import pytest
import yaml

from cptlab.config import Config, ConfigError, eval_domains, from_dict, load_config, to_dict, validate
from cptlab.errors import UserError
from cptlab.tasks import all_domain_names, domains_installed, get_domain, install_domains, make_split, verify
from helpers import assert_one_line_error

PRODUCTS = ["domains.products_small.task=products",
            "domains.products_small.config={min_digits: 1, max_digits: 2}",
            "domains.products_small.description=two factors below 100"]


def installed(preset: str, overrides: list[str] = ()):
    """A config loaded and its domains installed, as the entry points that run work do."""
    cfg = load_config(preset, list(overrides))
    install_domains(cfg.domains)
    return cfg


def test_loading_and_validating_a_config_changes_no_domain_until_it_is_installed():
    cfg = load_config("smoke", PRODUCTS + ["domains.gcd.config={max_value: 12}"])
    validate(cfg)
    assert "products_small" not in all_domain_names() and get_domain("gcd").task_config.get("max_value") != 12
    with domains_installed(cfg.domains):
        assert "products_small" in all_domain_names() and get_domain("gcd").task_config["max_value"] == 12
    assert "products_small" not in all_domain_names()  # the block's end restores the previous domains
    with pytest.raises(ConfigError, match="did you mean 'gcd'"):
        load_config("smoke", ["stages=[{domain: gdc, steps: 1}]"])


def test_a_new_domain_is_rendered_in_full_and_verified():
    cfg = installed("smoke", PRODUCTS + ["eval.domains=[all]", "prompt.answer_format=boxed"])
    assert "products_small" in all_domain_names() and eval_domains(cfg)[-1] == "products_small"
    d = get_domain("products_small")
    assert d.task == "products" and not d.has_compact and d.family == "products"
    for ex in make_split("products_small", "eval", 8, answer_format="boxed"):  # compact asked, full given
        assert "multiplication" in ex.question and "\\boxed{}" in ex.question
        a, b = (int(x) for x in ex.question.split(":")[1].split(".")[0].split("*"))
        assert a < 100 and b < 100 and ex.answer == str(a * b)  # the generator settings hold
        assert verify(ex, ex.solution()).correct and not verify(ex, "\\boxed{-1}").correct


def test_a_built_in_domain_takes_new_generator_settings_and_keeps_its_rendering():
    before = make_split("gcd", "eval", 64)
    installed("smoke", ["domains.gcd.config={max_value: 12}"])
    after = make_split("gcd", "eval", 64)
    assert get_domain("gcd").has_compact and after[0].question.startswith("gcd ")
    assert max(n for ex in after for n in ex.entry["metadata"]["numbers"]) <= 12
    assert max(n for ex in before for n in ex.entry["metadata"]["numbers"]) > 12
    assert get_domain("gcd").task_config["min_value"] == 1  # merged over the built-in settings
    installed("smoke")  # the next config without the section restores the built-in domain
    assert [e.question for e in make_split("gcd", "eval", 64)] == [e.question for e in before]


@pytest.mark.parametrize("overrides, field, needle", [
    (["domains.x.task=productz"], "domains.x.task", "did you mean products"),
    (["domains.x.task=products", "domains.x.config={min_digitz: 1}"], "domains.x.config",
     "unexpected keyword argument 'min_digitz'"),
    (["domains.x.task=products", "domains.x.config={min_digits: 3, max_digits: 1}"], "domains.x.config",
     "max_digits must be >= min_digits"),
    (["domains.x.task=products", "domains.x.config={seed: 3}"], "domains.x.config", "cptlab sets those"),
    (["domains.gcd.task=lcm"], "domains.gcd.task", "keeps its task"),
    (["domains.x.task=products", "domains.x.ood_of=nothing"], "domains.x.ood_of", "a domain name"),
    (["domains.all.task=products"], "domains.all", "not 'all'"),
    (["domains.x.task=products", "domains.x.eval_pool=0"], "domains.x.eval_pool", "[1, 512]"),
    (["domains.x.tsk=products"], "domains.x.tsk", "known key"),
])
def test_bad_domain_settings_name_the_field(overrides, field, needle):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides)
    message = str(err.value)
    assert f"'{field}'" in message and needle in message and "\n" not in message


def test_a_small_domain_needs_a_smaller_held_out_pool_to_train_on():
    one_digit = ["domains.p1.task=products", "domains.p1.config={min_digits: 1, max_digits: 1}"]
    installed("smoke", one_digit)  # 99 distinct questions, all drawn into a pool of 512
    with pytest.raises(UserError, match="domains.p1.eval_pool"):
        make_split("p1", "train", 10)
    installed("smoke", one_digit + ["domains.p1.eval_pool=40"])
    held_out = make_split("p1", "eval", 64)
    assert len(held_out) == 40  # eval sets are capped at the pool
    train = make_split("p1", "train", 200, seed=1)
    assert len(train) == 200 and not {e.question for e in held_out} & {e.question for e in train}


def test_train_and_eval_of_config_domains_never_overlap():
    installed("smoke", PRODUCTS + ["domains.gcd.config={max_value: 60}"])
    for name in ("products_small", "gcd"):
        held_out = {e.question for e in make_split(name, "eval", 512)}
        train = make_split(name, "train", 300, seed=2)
        assert len(train) == 300 and not held_out & {e.question for e in train}


def test_the_section_round_trips_through_a_run_directory_config(tmp_path):
    cfg = installed("smoke", PRODUCTS + ["domains.products_small.ood_of=arithmetic"])
    questions = [e.question for e in make_split("products_small", "eval", 16)]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    installed("smoke")  # another config in between
    resumed = from_dict(Config, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    validate(resumed)  # what a resumed run does: validate, then the driver installs its domains
    install_domains(resumed.domains)
    assert resumed.domains["products_small"].ood_of == "arithmetic"
    assert get_domain("products_small").family == "arithmetic"
    assert [e.question for e in make_split("products_small", "eval", 16)] == questions


def test_cptlab_domains_lists_a_config_file_s_domains_and_bad_settings_exit_2(tmp_path, cli):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: smoke\ndomains:\n  products_small: {task: products, config: {min_digits: 1, max_digits: 2}}\n")
    result = cli("domains", f)
    assert result.exit_code == 0, result.output
    assert "products_small" in result.stdout and "gcd" in result.stdout
    assert_one_line_error(cli("domains", f, "domains.products_small.config.max_digitz=3"),
                          "domains.products_small.config", "max_digitz")


@pytest.mark.slow
def test_a_study_child_process_trains_and_evaluates_a_config_domain(tmp_path):
    from cptlab.study import run_study

    preset = tmp_path / "with_domain.yaml"
    preset.write_text(
        "extends: smoke\n"
        "domains:\n  products_small: {task: products, config: {min_digits: 1, max_digits: 2}}\n"
        "eval: {domains: [arithmetic, products_small], every: 0, num_samples: 0}\n"
        "run: {checkpoint_every: 0}\n"
        "stages:\n  - {domain: products_small, steps: 1}\n")
    study = tmp_path / "st.yaml"
    study.write_text(f"question: config domains in children\npreset: {preset}\nseeds: [0, 1]\n"
                     "variants:\n  grpo: [method.name=grpo]\n")
    run_study(str(study), str(tmp_path / "runs"), jobs=2)  # two child processes load the preset file
    for cell in ("grpo-s0", "grpo-s1"):
        records = [json.loads(line) for line in (tmp_path / "runs" / "st" / cell / "metrics.jsonl").open()]
        evals = {(r["stage"], r["domain"]) for r in records if r["event"] == "eval"}
        assert {(0, "products_small"), (1, "products_small"), (1, "arithmetic")} <= evals
        assert any(r["event"] == "train" for r in records)
