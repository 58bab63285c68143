"""The run directory on disk, the source of truth: config.yaml, metrics.jsonl, checkpoints/, samples/.
Each metrics record, once on disk, also goes to the run's experiment trackers (trackers.py, rank 0).

Every file is written atomically (temp file or temp dir, fsynced, then renamed) and metrics lines
are appended, flushed and fsynced one by one; a line counts once its newline is on disk. A checkpoint
records how many metrics lines existed when it was taken and the size and sha256 of each of its
files, so a resumed run truncates whatever a crash left after it (no line is lost or written twice)
and refuses a checkpoint that was damaged after it was written.

A run holds its directory for as long as it runs: an exclusive flock on `.lock` (taken before the
directory is checked or written), so a second run into the same directory is refused instead of
interleaving with the first. The kernel drops the lock with the process, so a killed run leaves no
stale claim. JSON is written strictly: a NaN or infinite number is written as null (jq and other
strict readers reject bare NaN); readers accept both.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it. The one place run files reach the disk, so that a full
    disk (ENOSPC) surfaces here as an OSError naming the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a crash after os.replace must not undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; run files are shared like any other
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None  # name the file, not its temp twin
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=1) + "\n")


def strict_json(obj: Any) -> Any:
    """obj as plain JSON data: NaN/inf -> None, numpy and torch scalars -> Python numbers, arrays ->
    lists, tuples -> lists, Paths -> strings."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (bool, int, float, str)):  # numpy, torch
        return strict_json(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of obj (see strict_json); anything else that is not JSON data is a TypeError."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def _complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """(complete lines, byte length they span). A last line without its newline is complete only if
    it parses (the newline alone was lost); otherwise it is a torn write and not counted."""
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines(keepends=True)
    tail = data[end:]
    if tail.strip():
        try:
            complete = isinstance(json.loads(tail), dict)  # records are objects: a torn one never parses
        except ValueError:
            complete = False
        if complete:
            return [*lines, tail + b"\n"], len(data)
    return lines, end


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines; a torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        lines, _ = _complete_lines(f.read())
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path}: line {i + 1} is not valid JSON (the file was edited or corrupted)") from None
    return out


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


LOCK_NAME = ".lock"


class RunStore:
    """One run directory. Create with `RunStore.create` (new run) or `RunStore.open` (resume)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self._metrics_file = None
        self._lock: int | None = None
        self.metrics_lines = 0
        self._trackers = None  # trackers.Trackers, opened at the first record (run.report_to)
        self.made = None
        """What this process made: 'directory' (it created the run directory), 'contents' (it filled
        an empty one), None (it opened an existing run); `abandon` removes exactly that."""

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, config: dict, overwrite: bool = False) -> "RunStore":
        """A new run in `root`, claimed (see `claim`) before anything in it is looked at or written."""
        root = Path(root)
        existed = root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"output directory '{root}' is not writable ({e.strerror or e})") from None
        store = cls(root)
        store.claim()
        try:
            present = [p for p in root.iterdir() if p.name != LOCK_NAME]
            if present and not overwrite:
                raise UserError(f"run directory '{root}' already exists: pass --resume to continue it "
                                "or --overwrite to replace it")
            if present and not (root / "config.yaml").exists():
                raise UserError(f"--overwrite refused: '{root}' is not empty and is not a cptlab run directory")
            for p in present:  # the lock file stays: replacing it would let another run claim the new one
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            store.made = "contents" if existed else "directory"
            try:
                probe = root / ".write_test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise UserError(f"output directory '{root}' is not writable ({e.strerror or e})") from None
            store.write_config(config)
        except BaseException:
            store.release()
            raise
        return store

    @classmethod
    def open(cls, root: Path) -> "RunStore":
        """An existing run directory, for reading; `claim` it before writing."""
        root = Path(root)
        if not (root / "config.yaml").is_file():
            why = "no such directory" if not root.exists() else "no config.yaml in it"
            raise UserError(f"'{root}' is not a run directory ({why}); expected a directory written by cptlab run")
        return cls(root)

    def claim(self) -> None:
        """Hold the run directory for this process until `release` or its exit: an exclusive flock on
        root/.lock. The kernel drops a flock when its process dies, so a killed run can be resumed at
        once; a second live run into the directory is refused with one line."""
        if self._lock is not None:
            return
        path = self.root / LOCK_NAME
        for _ in range(3):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"output directory '{self.root}' is not writable ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise UserError(f"run directory '{self.root}' is in use by {who} (a cptlab run writing it); "
                                "wait for it to finish or use another --out") from None
            try:  # a run that abandoned its directory may have removed the file we opened: take the new one
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock = fd
                return
            os.close(fd)
            if not self.root.is_dir():
                break
        raise UserError(f"run directory '{self.root}' was removed while it was being claimed")

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def __del__(self) -> None:
        try:  # a store dropped without close() must not keep its directory claimed in this process
            self.release()
        except Exception:
            pass

    def abandon(self) -> None:
        """Remove what this process made (see `made`), then release: a run refused before its first
        record leaves nothing behind, and the corrected command is not refused as 'already exists'.
        Never touches a directory that held a run before."""
        self._close_metrics()
        self._close_trackers()
        if self.made == "directory":
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.made == "contents":
            for p in self.root.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        self.made = None
        self.release()

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
        """Keep the first `keep_lines` complete lines (what the checkpoint saw), byte for byte; drop
        the rest. Refuses (changing nothing) if fewer lines exist than the checkpoint recorded."""
        self._close_metrics()  # the file is replaced: appends must go to the new one
        data = self.metrics_path.read_bytes() if self.metrics_path.exists() else b""
        lines, _ = _complete_lines(data)
        records = [line for line in lines if line.strip()]
        if len(records) < keep_lines:
            raise UserError(f"{self.metrics_path}: {len(records)} complete lines, but the checkpoint was taken "
                            f"after {keep_lines}; the file was truncated or edited, resuming would lose records")
        atomic_write_bytes(self.metrics_path, b"".join(records[:keep_lines]))
        self.metrics_lines = keep_lines

    def _open_metrics(self) -> int:
        """Open metrics.jsonl for appending; a torn last line left by a crash is cut off first (or
        completed with its newline if only that was lost), so the next record starts on a new line."""
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.metrics_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        lines, end = _complete_lines(data)
        if end < len(data):
            os.ftruncate(fd, end)
        elif data and not data.endswith(b"\n"):
            os.write(fd, b"\n")
        self.metrics_lines = sum(1 for line in lines if line.strip())
        return fd

    def log(self, event: str, **fields: Any) -> dict:
        """Append one record to metrics.jsonl (flushed and fsynced), then hand it to the run's trackers."""
        record = {"event": event, **fields}
        data = strict_json(record)
        line = (json.dumps(data, allow_nan=False) + "\n").encode()
        if self._metrics_file is None:
            self._metrics_file = self._open_metrics()
        fd = self._metrics_file
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:  # leave no torn line behind (a full disk may have taken part of it)
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise OSError(e.errno, e.strerror, str(self.metrics_path)) from None
        self.metrics_lines += 1
        self._feed_trackers(self.metrics_lines - 1, data)
        return record

    def _feed_trackers(self, index: int, data: dict) -> None:
        """The experiment trackers of config.yaml's run.report_to (trackers.py) get every record as it is
        appended; they are opened at the first one, from the config the directory holds."""
        if self._trackers is None:
            from .trackers import Trackers

            try:
                config = self.read_config()
            except (UserError, OSError):
                config = {}
            self._trackers = Trackers(self.root, config)
        self._trackers.log(index, data, self.read_metrics)

    def _close_trackers(self) -> None:
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            os.close(self._metrics_file)
            self._metrics_file = None

    def close(self) -> None:
        """Close metrics.jsonl and the trackers, and release the claim on the directory."""
        self._close_metrics()
        self._close_trackers()
        self.release()

    # -- samples and summaries ---------------------------------------------------------------------
    def write_samples(self, tag: str, samples: dict[str, list[dict]]) -> None:
        atomic_write_json(self.samples / f"{tag}.json", samples)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.root / name, obj)

    def write_once(self, name: str, text: str) -> bool:
        """Write root/name atomically unless it already holds exactly `text` (a resumed run that redoes an
        evaluation leaves the file it wrote before the crash untouched). Returns whether it wrote."""
        path, data = self.root / name, text.encode()
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
        atomic_write_bytes(path, data)
        return True

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_states(self) -> list[tuple[Path, dict]]:
        """(dir, state.json) of the complete checkpoints (renamed into place, with state.json), oldest
        first. Temp dirs that a crash left half-written start with '.' and are ignored."""
        if not self.checkpoints.exists():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            if d.name.startswith(".") or not d.is_dir() or not (d / "state.json").is_file():
                continue
            try:
                state = json.loads((d / "state.json").read_text())
                order = state.get("order", 0)
            except (OSError, ValueError, AttributeError):
                raise UserError(f"checkpoint '{d}': state.json is corrupted; move that directory away to "
                                "resume from an older checkpoint") from None
            found.append((order, d, state))
        return [(d, state) for _, d, state in sorted(found, key=lambda x: x[0])]

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (see _checkpoint_states)."""
        return [d for d, _ in self._checkpoint_states()]

    def latest_stage_end(self) -> Path | None:
        """The newest checkpoint taken at a stage end (kept beside the `keep` newest, see
        commit_checkpoint): after a mid-stage resume, the previous stage's weights for drift."""
        ends = [d for d, state in self._checkpoint_states() if state.get("stage_done")]
        return ends[-1] if ends else None

    def new_checkpoint_dir(self, tag: str) -> tuple[Path, Path]:
        """(temp dir to fill, final path); call `commit_checkpoint` when the temp dir is complete."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{tag}."))
        return tmp, self.checkpoints / tag

    def commit_checkpoint(self, tmp: Path, final: Path, state: dict, keep: int, keep_stage_ends: bool = False) -> None:
        """Record the metrics line count and each file's size and sha256 in state.json (written last),
        make the temp dir durable, and rename it into place; then drop all but the `keep` newest and
        the newest stage-end checkpoint (the previous stage's weights, which drift needs after a resume
        from a mid-stage checkpoint; a stage-end checkpoint holds weights only), or with
        `keep_stage_ends` every trained stage's end too (run.keep_stage_models: each stage's model; the
        base's, stage 0, is not kept: RUN/base or model.path holds it)."""
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)}
                 for f in sorted(tmp.iterdir()) if f.is_file()}
        state = {**state, "metrics_lines": self.metrics_lines, "files": files}
        write_synced(tmp / "state.json", (json_text(state, indent=1) + "\n").encode())
        fsync_dir(tmp)
        old = None
        if final.exists():  # set the old copy aside; it is removed only once the new one is in place
            old = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{final.name}.old."))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        states = self._checkpoint_states()
        ends = [d for d, st in states if st.get("stage_done")]
        kept = set(ends[-1:])
        if keep_stage_ends:
            kept |= {d for d, st in states if st.get("stage_done") and st.get("stage", 0) > 0}
        for stale in self.checkpoint_dirs()[:-keep]:
            if stale not in kept:
                shutil.rmtree(stale, ignore_errors=True)


class FollowerStore(RunStore):
    """A non-main rank's view of the run directory under torchrun: it reads (config, checkpoints) but
    never writes; rank 0 owns every file."""

    def log(self, event: str, **fields: Any) -> dict:
        return {"event": event, **fields}

    def truncate_metrics(self, keep_lines: int) -> None:
        self.metrics_lines = keep_lines

    def write_samples(self, tag: str, samples: dict[str, list[dict]]) -> None:
        pass

    def write_json(self, name: str, obj: Any) -> None:
        pass

    def write_once(self, name: str, text: str) -> bool:
        return False
