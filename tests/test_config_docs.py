"""docs/config.md is `cptlab config --markdown`: generated from the field docstrings, kept current here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cptlab.config import Config, DomainSpec, StageConfig, field_docs
from cptlab.config.describe import markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_docs_config_md_is_the_generated_reference(cli):
    result = cli("config", "--markdown")
    assert result.exit_code == 0, result.output
    assert result.stdout == markdown()
    assert DOCS.read_text() == result.stdout, (
        "docs/config.md is out of date: regenerate it with `cptlab config --markdown > docs/config.md`")


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", field_docs(cls)[f.name]


def test_every_field_has_a_row_with_its_docstring_and_default():
    text = markdown()
    rows = {line.split(" | ")[0][3:-1]: line for line in text.splitlines() if line.startswith("| `")}
    fields = list(_leaf_fields(Config)) + list(_leaf_fields(StageConfig)) + list(_leaf_fields(DomainSpec))
    assert len(fields) > 100
    for key, doc in fields:
        assert key in rows, key
        assert " ".join(doc.split()).replace("|", "\\|") in rows[key], key
    # hand-read defaults of schema.py
    assert "| `method.lr` | `float` | `3e-05` |" in rows["method.lr"]
    assert "| `method.sdpo.distillation.divergence` |" in rows["method.sdpo.distillation.divergence"]
    assert "`'jsd'`" in rows["method.sdpo.distillation.divergence"]
    assert rows["steps"].startswith("| `steps` | `int` | `50` |")  # a stage's field


def test_markdown_of_a_preset_shows_its_values_beside_the_defaults(cli):
    result = cli("config", "--markdown", "smoke", "method.lr=0.001")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("| `method.lr` |"))
    assert row.startswith("| `method.lr` | `float` | `0.001` | `3e-05` |")
    row = next(line for line in result.stdout.splitlines() if line.startswith("| `rollout.max_new_tokens` |"))
    assert "| `24` |" in row  # smoke's value
