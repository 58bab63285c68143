"""Every field's docstring, for `cptlab config`."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

from .build import to_dict


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


def _cell(text: str) -> str:
    """One Markdown table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(value: Any) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def _section_table(rows: list[tuple[str, Any, Any, str, str]], with_value: bool) -> list[str]:
    head = ["| field | type | default | meaning |", "|---|---|---|---|"]
    if with_value:
        head = ["| field | type | value | default | meaning |", "|---|---|---|---|---|"]
    out = list(head)
    for key, value, default, type_, doc in rows:
        cells = [f"`{key}`", _cell(f"`{type_}`"), *([_value(value)] if with_value else []), _value(default), _cell(doc)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _rows(cls_or_obj: Any, prefix: str = "") -> list[tuple[str, Any, Any, str, str, bool]]:
    """(key, value, default, type, doc, is_section) for every field, nested sections flattened."""
    docs = field_docs(cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj))
    out = []
    for f in dataclasses.fields(cls_or_obj):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(cls_or_obj, f.name, default) if not isinstance(cls_or_obj, type) else default
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.append((key, value, None, str(f.type), docs.get(f.name, ""), True))
            out.extend(_rows(value, key + "."))
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [to_dict(v) for v in value]
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            value = {k: to_dict(v) for k, v in value.items()}
        out.append((key, value, default, str(f.type), docs.get(f.name, ""), False))
    return out


def markdown(cfg: Any = None) -> str:
    """The config reference as Markdown (docs/config.md is this with `cfg` None): one table per section,
    every field with its type, default and docstring, then the fields of a stage and of a domain entry.
    Given a config (a preset with overrides), a `value` column shows its values beside the defaults."""
    from .schema import Config, DomainSpec, StageConfig

    with_value = cfg is not None
    rows = _rows(cfg if with_value else Config)
    lines = ["# Config reference", "",
             "Generated from the field docstrings of `src/cptlab/config/schema.py` by `cptlab config --markdown`",
             "(tests/test_config_docs.py checks that this page matches). A field is set in a YAML file",
             "(`method: {lr: 1e-4}`) or on the command line as a dotted override (`method.lr=1e-4`);",
             "`cptlab config [PRESET|FILE] [key=value ...]` prints the values a run would use.", ""]
    top: list[tuple] = []

    def flush(title: str, doc: str, body: list[tuple]) -> None:
        if not body:
            return
        lines.extend([f"## `{title}`", ""] if title else [])
        if doc:
            lines.extend([_cell(doc), ""])
        lines.extend(_section_table([r[:5] for r in body], with_value))
        lines.append("")

    sections: dict[str, tuple[str, list[tuple]]] = {}
    for row in rows:
        key, *_rest, doc, is_section = row
        if is_section:
            sections[key] = (doc, [])
        elif "." not in key:
            top.append(row)
        else:
            sections[key.rsplit(".", 1)[0]][1].append(row)
    for key, (doc, body) in sections.items():
        flush(key, doc, body)
    flush("top level", "", top)
    for title, cls in (("stages[]", StageConfig), ("domains.NAME", DomainSpec)):
        flush(title, inspect.cleandoc(cls.__doc__ or ""), [r for r in _rows(cls) if not r[5]])
    return "\n".join(lines).rstrip() + "\n"
