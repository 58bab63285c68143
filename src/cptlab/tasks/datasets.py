"""Data-set domains: questions from a file (or a `datasets` directory) checked by a verifier.

A domain of the config's `domains` section with a `source` (and/or an `eval_source`) is read here:
  - files: .jsonl, .json (a list of objects, or one under "data"/"rows"), .csv, .parquet; a directory
    written by `datasets`' save_to_disk (a Dataset, or a DatasetDict with `split`), or a directory of
    parquet files (a hub snapshot: files under a `split` folder or named `<split>-*.parquet`);
    "cptlab:NAME" is a data file shipped with cptlab (src/cptlab/data/NAME).
  - only the mapped columns are read, in batches (parquet and arrow through pyarrow), never a whole
    table at once; a field may name a nested value ("reward_model.ground_truth", "prompt.-1.content").
  - `fields` maps cptlab's names (question, answer, choices, tools, test, tests, entry_point, prefix,
    reasoning; any other name is passed to the verifier as it is) to the file's columns.
  - each row becomes an item under cptlab's names, normalised by its verifier (choices to a list, the
    answer to an option letter, a tool call to {name, arguments}, ...).
  - the split is deterministic and disjoint: rows are ordered by a hash of their rendered question
    (sha256, so the order is a property of the question, not of the file); duplicates are dropped;
    without an eval source the first `eval_pool` rows by hash are held out and the rest train, with
    one every question in the eval source is removed from training.
Every problem with the data is a ConfigError naming the field (`domains.NAME.source`) and the row.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError

EVAL_POOL_DEFAULT = 512
"""Held-out rows of a data set without an eval source: at most this many, and at most half."""
ROW_BATCH = 1024
"""Rows per batch read from parquet and arrow files."""
KNOWN_FIELDS = ("question", "answer", "choices", "tools", "test", "tests", "entry_point", "prefix", "reasoning")
SPLIT_SALT = "cptlab-split-v1"


@dataclass(frozen=True)
class TableRef:
    """One table to read: a path (or a cptlab: name) and, for a directory of splits, the split."""

    path: str
    split: str | None = None

    def describe(self) -> str:
        return self.path + (f" [{self.split}]" if self.split else "")


@dataclass
class LoadedDataset:
    train: list[dict]
    """Training items, in hash order."""
    eval: list[dict]
    """Held-out items, in hash order (eval sets are prefixes of it)."""
    rows: int = 0
    """Rows read from the source(s)."""
    duplicates: int = 0
    """Rows dropped because their rendered question was seen before."""
    overlap: int = 0
    """Training rows dropped because their question is in the eval source."""
    skipped: int = 0
    """Rows skipped as bad (bad_rows: skip)."""
    fingerprint: str = ""
    """sha256 over the source files' sizes and times and the domain's definition."""
    info: dict = field(default_factory=dict)


def resolve_path(path: str) -> Path:
    if path.startswith("cptlab:"):
        return Path(str(resources.files("cptlab") / "data" / path[len("cptlab:"):]))
    return Path(os.path.expanduser(path))


# --- reading tables ------------------------------------------------------------------------------


def _top(column: str) -> str:
    return column.split(".", 1)[0]


def _arrow_batches(paths: list[Path], columns: list[str], where: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            _check_columns(columns, names, where, path)
            batches = pf.iter_batches(batch_size=ROW_BATCH, columns=sorted({_top(c) for c in columns}))
        else:
            source = pa.memory_map(str(path))
            try:  # save_to_disk writes the IPC stream format; a plain .arrow file may be the file format
                stream = pa.ipc.open_stream(source)
                names, batches = stream.schema.names, stream
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source)
                names, batches = table.schema.names, (table.get_batch(i) for i in range(table.num_record_batches))
            _check_columns(columns, names, where, path)
        for batch in batches:
            cols = {name: batch.column(name).to_pylist() for name in sorted({_top(c) for c in columns})
                    if name in batch.schema.names}
            _check_columns(columns, list(cols), where, path)
            for i in range(batch.num_rows):
                yield {name: values[i] for name, values in cols.items()}


def _check_columns(columns: list[str], names: list[str], where: str, path: Path) -> None:
    missing = [c for c in columns if _top(c) not in names]
    if missing:
        raise ConfigError(where, str(path), f"a table with column '{_top(missing[0])}' (it has "
                          + ", ".join(names[:20]) + ("..." if len(names) > 20 else "") + ")")


def _split_files(root: Path, split: str | None, where: str) -> list[Path]:
    """The files of a directory table: a save_to_disk Dataset / DatasetDict, or parquet files."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise ConfigError(where, str(root), f"a split of this DatasetDict ({', '.join(splits)}); "
                              f"set the split{'' if split else ' (there is no train split)'}")
        return _split_files(root / chosen, None, where)
    if (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        files = [root / f["filename"] for f in state.get("_data_files", [])]
        if split and split != state.get("_split"):
            raise ConfigError(where, str(root), f"split '{state.get('_split')}' (a single Dataset); drop the split")
        return files
    parquet = sorted(root.rglob("*.parquet"))
    if split:
        parquet = [p for p in parquet if split in p.relative_to(root).parts[:-1] or p.name.startswith(split)]
    if not parquet:
        raise ConfigError(where, str(root), "a datasets save_to_disk directory or a directory of parquet files"
                          + (f" with split '{split}'" if split else ""))
    return parquet


def read_rows(ref: TableRef, columns: list[str], where: str) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) for each row, with at least `columns` (top-level names) read."""
    path = resolve_path(ref.path)
    if not path.exists():
        raise ConfigError(where, ref.path, "an existing file or directory (.jsonl, .json, .csv, .parquet, "
                          "or a datasets save_to_disk directory)")
    if path.is_dir():
        yield from enumerate(_arrow_batches(_split_files(path, ref.split, where), columns, where), start=1)
        return
    if ref.split:
        raise ConfigError(where.rsplit(".", 1)[0] + ".split", ref.split, "no split for a single file (drop it)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from enumerate(_arrow_batches([path], columns, where), start=1)
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path, ref.path, columns, where)
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ConfigError(where, ref.path, f"valid JSON ({e.msg} at line {e.lineno})") from None
            # JSON lines under a .json name (the study's preprocessed ToolUse and SciKnowEval files)
            yield from _jsonl_rows(path, ref.path, columns, where)
            return
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "rows", "examples") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ConfigError(where, ref.path, "a JSON list of objects (or one under 'data')")
        for number, row in enumerate(data, start=1):
            _check_row(row, columns, where, ref.path, number)
            yield number, row
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            _check_columns(columns, list(reader.fieldnames or []), where, path)
            yield from enumerate(reader, start=2)  # line 1 is the header
    else:
        raise ConfigError(where, ref.path, "a .jsonl, .json, .csv or .parquet file or a datasets directory")


def _jsonl_rows(path: Path, shown: str, columns: list[str], where: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(where, shown, f"JSON lines (line {line_no} is not valid JSON: {e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(where, shown, f"one JSON object per line (line {line_no} is a {type(row).__name__})")
            _check_row(row, columns, where, shown, line_no)
            yield line_no, row


def _check_row(row: dict, columns: list[str], where: str, path: str, number: int) -> None:
    missing = [c for c in columns if _top(c) not in row]
    if missing:
        raise ConfigError(where, path, f"rows with column '{_top(missing[0])}' (row {number} has "
                          + ", ".join(list(row)[:20]) + ")")


def get_path(row: dict, column: str) -> Any:
    """A value by dotted path: 'a.b' (a key), 'a.0' / 'a.-1' (a list index)."""
    value: Any = row
    for part in column.split("."):
        if isinstance(value, list) and part.lstrip("-").isdigit():
            value = value[int(part)] if -len(value) <= int(part) < len(value) else None
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def message_text(value: Any) -> Any:
    """A chat-message list ([{role, content}, ...], as verl's parquet files hold prompts) -> the last
    user message's content; anything else unchanged."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role", "user") == "user"]
        return str((users or value)[-1]["content"])
    return value


# --- rendering, splitting --------------------------------------------------------------------------


def template_slots(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render_choices(choices: list[str]) -> str:
    return "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def render_question(template: str, item: dict, raw: dict) -> str:
    """The question text: the template over the item's fields and the raw mapped columns, then the
    options (choices) and the tools, where the template does not place them itself."""
    values = {**{k: v for k, v in raw.items()}, **item}
    slots = template_slots(template)
    if "choices" in item and isinstance(item["choices"], list):
        values["choices"] = render_choices(item["choices"])
    if item.get("tools") is not None:
        values["tools"] = item["tools"] if isinstance(item["tools"], str) else json.dumps(item["tools"])
    text = template.format(**{s: values.get(s, "") for s in slots})
    if "choices" in item and "choices" not in slots:
        text += "\n" + values["choices"]
    if item.get("tools") is not None and "tools" not in slots:
        text = f"Tools: {values['tools']}\n{text}"
    return text.strip()


def _matches(value: Any, want: Any) -> bool:
    return value in want if isinstance(want, list) else value == want


def _shuffled(item: dict) -> dict:
    """The options in an order seeded by the question; a textual answer follows its option, an index or
    letter answer is moved with it."""
    choices = list(item["choices"])
    order = list(range(len(choices)))
    random.Random(split_hash(str(item["question"]))).shuffle(order)
    answer = item.get("answer")
    if isinstance(answer, int) or (isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha()):
        index = answer if isinstance(answer, int) else ord(answer.strip().upper()) - 65
        if 0 <= index < len(choices):
            answer = order.index(index)
    return {**item, "choices": [choices[i] for i in order], "answer": answer}


def question_key(text: str) -> str:
    return " ".join(text.split()).lower()


def split_hash(key: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}\0{key}".encode()).hexdigest()


def _fingerprint(refs: list[TableRef], definition: str) -> str:
    h = hashlib.sha256(definition.encode())
    for ref in refs:
        path = resolve_path(ref.path)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_dataset(spec: Any, where: str) -> LoadedDataset:
    """Read a data-set domain (spec: config.DomainSpec) into its train and eval items. Cached per
    process by the files' sizes and times and the spec, so every config validation does not reread."""
    refs = [TableRef(spec.source, spec.split)] if spec.source else []
    eval_path = spec.eval_source or (spec.source if spec.eval_split else None)
    if eval_path:
        refs.append(TableRef(eval_path, spec.eval_split))
    definition = json.dumps([spec.source, spec.split, spec.eval_source, spec.eval_split, spec.fields, spec.template,
                             spec.verifier, spec.verifier_options, spec.eval_pool, spec.bad_rows, spec.filter,
                             spec.extract, spec.shuffle_choices], default=str)
    return _load_cached(definition, _fingerprint(refs, definition), where)


@functools.lru_cache(maxsize=32)
def _load_cached(definition: str, fingerprint: str, where: str) -> LoadedDataset:
    from ..verifiers import get_verifier, prepare_item

    (source, split, eval_source, eval_split, fields, template, verifier, _, eval_pool, bad_rows, filters, extract,
     shuffle) = json.loads(definition)
    v = get_verifier(verifier, f"{where}.verifier")
    patterns = {}
    for name, pattern in extract.items():
        if name not in fields:
            raise ConfigError(f"{where}.extract.{name}", pattern, "a regular expression for a field named in fields")
        try:
            patterns[name] = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}.extract.{name}", pattern, f"a regular expression ({e})") from None
        if patterns[name].groups < 1:
            raise ConfigError(f"{where}.extract.{name}", pattern, "a regular expression with a group (...)")
    if "question" not in fields:
        raise ConfigError(f"{where}.fields", fields, "a mapping with question: COLUMN (and the columns the "
                          f"verifier reads: {', '.join(v.needs) or 'none'})")
    for name in v.needs:
        if name not in fields:
            raise ConfigError(f"{where}.fields", fields, f"a column for '{name}' (verifier '{v.name}' reads it)")
    slots = template_slots(template)
    mapped = [c for col in fields.values() for c in (col if isinstance(col, list) else [col])]
    columns = sorted(set(mapped) | set(filters) | {s for s in slots if s not in fields and s not in ("choices", "tools")})

    counts = dict(rows=0, duplicates=0, skipped=0, overlap=0, filtered=0)

    def items(ref: TableRef, field_name: str) -> dict[str, tuple[str, dict]]:
        """hash -> (key, item), first occurrence of each question."""
        out: dict[str, tuple[str, dict]] = {}
        for number, row in read_rows(ref, columns, f"{where}.{field_name}"):
            counts["rows"] += 1
            if not all(_matches(get_path(row, c), want) for c, want in filters.items()):
                counts["filtered"] += 1
                continue
            raw = {c: message_text(get_path(row, c)) for c in columns}
            item = {name: [raw[c] for c in col] if isinstance(col, list) else raw[col] for name, col in fields.items()}
            try:
                for name, pattern in patterns.items():
                    m = pattern.search(str(item[name]))
                    if m is None:
                        raise ValueError(f"extract.{name} does not match its text")
                    item[name] = m.group(1).strip()
                if item.get("question") in (None, ""):
                    raise ValueError("the question is empty")
                if shuffle and isinstance(item.get("choices"), list):
                    item = _shuffled(item)
                item = prepare_item(v, item)
                text = render_question(template, item, raw)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                if bad_rows == "skip":
                    counts["skipped"] += 1
                    continue
                raise ConfigError(f"{where}.{field_name}", ref.describe(),
                                  f"rows its verifier '{v.name}' accepts (row {number}: {e}; "
                                  f"bad_rows: skip drops such rows)") from None
            key = question_key(text)
            digest = split_hash(key)
            if digest in out:
                counts["duplicates"] += 1
                continue
            out[digest] = (key, {**item, "question_text": text})
        if not out:
            raise ConfigError(f"{where}.{field_name}", ref.describe(), "a table with at least one usable row (it has none)")
        return out

    train_rows = items(TableRef(source, split), "source") if source else {}
    eval_rows: dict[str, tuple[str, dict]]
    if eval_source or eval_split:
        ref = TableRef(eval_source or source, eval_split)
        if source and resolve_path(ref.path).resolve() == resolve_path(source).resolve() and ref.split == split:
            raise ConfigError(f"{where}.eval_source", ref.describe(), "another table than the training source "
                              "(the same table would evaluate on the training questions)")
        eval_rows = items(ref, "eval_source" if eval_source else "eval_split")
        size = eval_pool or len(eval_rows)
        before = len(train_rows)
        train_rows = {h: r for h, r in train_rows.items() if h not in eval_rows}
        counts["overlap"] = before - len(train_rows)
        held = sorted(eval_rows)[:size]
        train = [train_rows[h][1] for h in sorted(train_rows)]
    else:
        ordered = sorted(train_rows)
        size = eval_pool or min(EVAL_POOL_DEFAULT, len(ordered) // 2)
        if size < 1 or size >= len(ordered):
            raise ConfigError(f"{where}.eval_pool", eval_pool, f"a held-out size from 1 to {len(ordered) - 1} "
                              f"(the source has {len(ordered)} distinct questions; give an eval_source to "
                              "evaluate on another table)")
        held, rest = ordered[:size], ordered[size:]
        eval_rows = train_rows
        train = [train_rows[h][1] for h in rest]
    if source and not train:
        raise ConfigError(f"{where}.source", source, "training rows left after removing the eval questions (none are)")
    evals = [eval_rows[h][1] for h in held]
    info = dict(train=len(train), eval=len(evals), **counts, verifier=v.name)
    return LoadedDataset(train, evals, counts["rows"], counts["duplicates"], counts["overlap"], counts["skipped"],
                         fingerprint, info)
