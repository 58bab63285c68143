"""The run directory on disk, the source of truth: config.yaml, metrics.jsonl, checkpoints/, samples/.

Every file is written atomically (temp file or temp dir, then rename) and metrics lines are flushed
and fsynced one by one. A checkpoint records how many metrics lines existed when it was taken, so a
resumed run truncates whatever a crash left after it: no line is lost or written twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines; a torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # unterminated last line
                break
            raise UserError(f"{path}: line {i + 1} is not valid JSON (the file was edited or corrupted)") from None
    return out


class RunStore:
    """One run directory. Create with `RunStore.create` (new run) or `RunStore.open` (resume)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self._metrics_file = None
        self.metrics_lines = 0

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, config: dict, overwrite: bool = False) -> "RunStore":
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise UserError(f"run directory '{root}' already exists: pass --resume to continue it "
                                "or --overwrite to replace it")
            if not (root / "config.yaml").exists():
                raise UserError(f"--overwrite refused: '{root}' is not empty and is not a cptlab run directory")
            shutil.rmtree(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output directory '{root}' is not writable ({e.strerror or e})") from None
        store = cls(root)
        store.write_config(config)
        return store

    @classmethod
    def open(cls, root: Path) -> "RunStore":
        root = Path(root)
        if not (root / "config.yaml").is_file():
            raise UserError(f"--resume '{root}': not a run directory (no config.yaml)")
        return cls(root)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.root / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        try:
            data = yaml.safe_load((self.root / "config.yaml").read_text())
        except yaml.YAMLError:
            raise UserError(f"{self.root / 'config.yaml'}: not valid YAML") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.root / 'config.yaml'}: expected a mapping")
        return data

    # -- metrics ------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, keep_lines: int) -> None:
        """Keep the first `keep_lines` complete lines (what the checkpoint saw), drop the rest."""
        lines = self.read_metrics()[:keep_lines]
        atomic_write_text(self.metrics_path, "".join(json.dumps(x, default=_jsonable) + "\n" for x in lines))
        self.metrics_lines = len(lines)

    def log(self, event: str, **fields: Any) -> dict:
        record = {"event": event, **fields}
        if self._metrics_file is None:
            self.metrics_lines = len(self.read_metrics()) if self.metrics_path.exists() else 0
            self._metrics_file = open(self.metrics_path, "a")
        self._metrics_file.write(json.dumps(record, default=_jsonable) + "\n")
        self._metrics_file.flush()
        os.fsync(self._metrics_file.fileno())
        self.metrics_lines += 1
        return record

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    # -- samples and summaries ---------------------------------------------------------------------
    def write_samples(self, tag: str, samples: dict[str, list[dict]]) -> None:
        atomic_write_json(self.samples / f"{tag}.json", samples)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.root / name, obj)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints (those with state.json), oldest first."""
        if not self.checkpoints.exists():
            return []
        dirs = [d for d in self.checkpoints.iterdir() if d.is_dir() and (d / "state.json").is_file()
                and not d.name.startswith(".")]
        return sorted(dirs, key=lambda d: json.loads((d / "state.json").read_text()).get("order", 0))

    def new_checkpoint_dir(self, tag: str) -> tuple[Path, Path]:
        """(temp dir to fill, final path); call `commit_checkpoint` when the temp dir is complete."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{tag}."))
        return tmp, self.checkpoints / tag

    def commit_checkpoint(self, tmp: Path, final: Path, state: dict, keep: int) -> None:
        state = {**state, "metrics_lines": self.metrics_lines}
        atomic_write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
