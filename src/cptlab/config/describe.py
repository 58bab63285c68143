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
