"""A local sandbox (Linux) for untrusted Python programs written by a language model: the `code`
verifier runs a completion against its tests with `run_program`, and nothing the program does may
hurt the training run or the machine. Standard library only.

Each program runs as `python -I -B <this file>` in a subprocess with its own session (process group),
in a fresh temporary directory (removed afterwards), with a minimal environment, stdin from a file,
stdout and stderr into files read back as their tail (a flood never reaches our memory). The parent
SIGKILLs the whole process group at the wall-clock limit and after every run. Before the program's
first line, this file, as the child's __main__, sets up in order:

1. Network namespace (CAP_SYS_ADMIN, e.g. root): `unshare(CLONE_NEWNET)`, not even the host's loopback.
2. Uid drop (root only): in a private mount namespace the sandbox directory becomes a tmpfs owned by
   nobody (at most 256 x max_output_bytes: no filling the disk), and a directory that nobody may not
   pass through on the way to sys.path (e.g. /root for a pyenv Python) is covered by a tmpfs that
   shows only sys.path; then uid/gid 65534, so that file permissions and RLIMIT_NPROC hold.
3. Rlimits: CPU seconds, address space, file size (which also caps stdout and stderr), processes,
   no core files; no new privileges; SIGKILL for the child if its parent thread dies.
4. An audit hook (PEP 578) raising "blocked: ...": writes, removals and other changes outside the
   sandbox directory, leaving it, os.open outside it, links; sockets other than local socket pairs
   (unless `network`); process creation (fork, exec, system, posix_spawn, subprocess, pty); signals
   to other processes; ctypes, cffi, CPython's test modules; changes to the hook's own functions.

Not guaranteed:
- The audit hook is a Python-level layer, and without root the only one for files and processes;
  without namespaces, network is blocked in-process only. Native code escapes it: an installed C
  extension that wraps system calls, a CPython memory bug, or `_imp.create_builtin`, which hands out
  fresh builtin modules without an audit event (so the stubs for unaudited calls such as
  `signal.pidfd_send_signal`, which could signal a trainer of the same uid, are speed bumps).
  Blocking ctypes makes an escape harder, not impossible. No seccomp filter, no pid namespace.
- Reading is limited by file permissions only (as nobody: world-readable files).
- Without root, a program can write many small files into its directory until its time is up.
- RLIMIT_NPROC counts all processes and threads of uid 65534 on the machine: with more concurrent
  sandboxes than `max_processes`, programs cannot start threads.
- A completion runs in the same process as its tests and can end it with status "ok" (os._exit(0))
  before they run: a verifier should look for output printed after the tests.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

NOBODY = 65534
_SETUP_FAILED = 70  # exit code of a child whose sandbox could not be set up
_BLOCKED_LINE = re.compile(r"^[\w.]+: (blocked: .+)$")
CLONE_NEWNS, CLONE_NEWNET, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 0x00020000, 0x40000000, 1, 38
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    wall_seconds: float = 10.0
    """Wall-clock limit; at it the program's whole process group is killed (SIGKILL): status "timeout"."""
    cpu_seconds: int = 10
    """RLIMIT_CPU: SIGXCPU at this many CPU seconds, SIGKILL a second later: status "timeout"."""
    memory_mb: int = 1024
    """RLIMIT_AS, the address space in MiB; a MemoryError at it gives status "memory"."""
    max_processes: int = 16
    """RLIMIT_NPROC (processes and threads); the kernel enforces it only after the uid drop (root)."""
    max_output_bytes: int = 65536
    """Bytes of stdout and of stderr kept (the tail), and RLIMIT_FSIZE on any file the program writes:
    a write past it fails (OSError, EFBIG), which ends most programs with status "failed"."""
    network: bool = False
    """False: no network (a network namespace where possible, else blocked in-process)."""

    def __post_init__(self):
        for f in fields(self):
            if f.name != "network" and not getattr(self, f.name) > 0:
                raise ValueError(f"SandboxLimits.{f.name} = {getattr(self, f.name)!r}: expected a positive number")


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended."""

    status: str
    """"ok" (exit 0) | "failed" (non-zero exit, uncaught exception) | "timeout" (wall clock or CPU) |
    "memory" | "blocked" (died of a refused action) | "error" (the sandbox itself failed to start)."""
    returncode: int | None
    """Exit code, negative for a signal (-9 after the wall-clock kill); None if it never started."""
    stdout: str
    """At most max_output_bytes of stdout (the tail), decoded as UTF-8 with errors replaced."""
    stderr: str
    """Idem for stderr; the tail, which ends with the traceback even after a flood."""
    seconds: float
    """Wall-clock seconds, from the start of the sandbox to the end of the program."""
    reason: str
    """One line for people: "" when ok, else what ended it (e.g. "timed out after 10 s (wall
    clock)", "blocked: network access is not allowed", or the traceback's last line)."""


# ---- the parent's side ---------------------------------------------------------------------------

def run_program(source: str, *, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> ProgramResult:
    """Run `source` as __main__ in the sandbox; never raises for anything the program does."""
    return _run(source, limits, stdin, "run")


def run_programs(sources: list[str], *, limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                 stdins: list[str] | None = None) -> list[ProgramResult]:
    """Run many programs at once (threads that each wait on one subprocess; workers default to the
    CPU count), each with its stdin (stdins[i], default empty); results in input order."""
    from concurrent.futures import ThreadPoolExecutor
    if stdins is not None and len(stdins) != len(sources):
        raise ValueError(f"run_programs: {len(stdins)} stdins for {len(sources)} programs")
    inputs = stdins if stdins is not None else [""] * len(sources)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_program(job[0], limits=limits, stdin=job[1]), zip(sources, inputs)))


def isolation() -> dict[str, bool]:
    """What this machine enforces, probed once by a sandboxed child: network_namespace, uid_drop
    (to nobody, with private mounts where needed), audit_hook, rlimits."""
    return dict(_probe())


@functools.cache
def _probe() -> tuple[tuple[str, bool], ...]:
    try:
        found = json.loads(_run("", SandboxLimits(), "", "probe").stdout)
    except ValueError:
        found = {}
    return tuple((key, bool(found.get(key))) for key in ("network_namespace", "uid_drop", "audit_hook", "rlimits"))


def _run(source: str, limits: SandboxLimits, stdin: str, mode: str) -> ProgramResult:
    import subprocess  # not at the top: the child imports this file, and must never hold subprocess
    start, base = time.monotonic(), None
    try:
        base = os.path.realpath(tempfile.mkdtemp(prefix="cptlab_sandbox_"))
        os.chmod(base, 0o711)  # nobody may pass through to work/, not open our files beside it
        work, files = os.path.join(base, "work"), {name: os.path.join(base, name) for name in ("stdout", "stderr")}
        os.mkdir(work, 0o700)
        for path, text in ((os.path.join(work, "program.py"), source), (os.path.join(base, "stdin"), stdin)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-I", "-B", "-X", "utf8", os.path.abspath(__file__), work,
                   json.dumps(asdict(limits)), mode]
        with open(os.path.join(base, "stdin"), "rb") as fin, open(files["stdout"], "wb") as fout, \
                open(files["stderr"], "wb") as ferr:
            child = subprocess.Popen(command, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                     start_new_session=True)
        timed_out, cpu_seconds = _wait(child, limits.wall_seconds)
        stdout, stderr = (_tail(files[name], limits.max_output_bytes) for name in ("stdout", "stderr"))
    except Exception as e:  # the sandbox itself failed: no interpreter, a full disk, ...
        return ProgramResult("error", None, "", "", time.monotonic() - start, f"the sandbox failed to start: {e}")
    finally:
        if base:
            _remove(base)
    status, reason = _classify(timed_out, child.returncode, cpu_seconds, stderr, limits)
    return ProgramResult(status, child.returncode, stdout, stderr, time.monotonic() - start, reason)


def _wait(child, wall_seconds: float) -> tuple[bool, float]:
    """Wait for the child without reaping it, so that its pid (= its process group id) cannot be
    reused before the group is killed; then SIGKILL whatever is left of the group, and reap.
    Returns (timed out, CPU seconds used)."""
    deadline, pause, timed_out = time.monotonic() + wall_seconds, 0.001, False
    try:
        while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if (timed_out := time.monotonic() >= deadline):
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, 0.02)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except OSError:
            pass
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return timed_out, usage.ru_utime + usage.ru_stime


def _remove(base: str) -> None:
    for parent, dirs, _ in os.walk(base):  # a program may have made its own directories unreadable
        for name in dirs:
            try:
                os.chmod(os.path.join(parent, name), 0o700)
            except OSError:
                pass
    shutil.rmtree(base, ignore_errors=True)


def _tail(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read().decode("utf-8", errors="replace")


def _classify(timed_out: bool, code: int, cpu_seconds: float, stderr: str, limits: SandboxLimits) -> tuple[str, str]:
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if timed_out:
        return "timeout", f"timed out after {limits.wall_seconds:g} s (wall clock)"
    if code == 0:
        return "ok", ""
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu_seconds >= limits.cpu_seconds):
        return "timeout", f"timed out: exceeded the CPU time limit ({limits.cpu_seconds} s)"
    if code == -signal.SIGXFSZ or f"[Errno {errno.EFBIG}]" in last:  # Python ignores SIGXFSZ: writes fail
        return "failed", f"wrote more than the output limit ({limits.max_output_bytes} bytes) to stdout, stderr or a file"
    if code == _SETUP_FAILED and last.startswith("sandbox setup failed"):
        return "error", last
    if (blocked := _BLOCKED_LINE.match(last)):
        return "blocked", blocked.group(1)
    if last.startswith("MemoryError"):
        return "memory", f"exceeded the memory limit ({limits.memory_mb} MB)"
    if code < 0:
        return "failed", f"killed by {signal.Signals(-code).name}"
    return "failed", last or f"exited with code {code}"


# ---- the child's side: this file is its __main__ -------------------------------------------------

class SandboxBlocked(PermissionError):
    """A refused action: an OSError, so that code tolerating a refused write (importlib) goes on."""


class SandboxBlockedImport(ImportError):
    """A refused import, so that `try: import ctypes / except ImportError` (numpy) goes on."""


def _boot(work: str, limits: SandboxLimits, mode: str) -> None:
    """Set up 1.-4. of the module docstring, then run program.py ("run") or report what held ("probe")."""
    import ctypes
    import resource
    import runpy
    import traceback
    achieved = {"network_namespace": False, "uid_drop": False, "audit_hook": False, "rlimits": False}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        achieved["network_namespace"] = not limits.network and libc.unshare(CLONE_NEWNET) == 0
        achieved["uid_drop"] = os.getuid() == 0 and _drop_to_nobody(libc, work, limits.max_output_bytes)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid change, which clears it
        for which, soft, hard in ((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
                                  (resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20),
                                  (resource.RLIMIT_FSIZE, limits.max_output_bytes, limits.max_output_bytes),
                                  (resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes),
                                  (resource.RLIMIT_CORE, 0, 0)):
            ceiling = resource.getrlimit(which)[1]
            if ceiling != resource.RLIM_INFINITY:
                soft, hard = min(soft, ceiling), min(hard, ceiling)
            resource.setrlimit(which, (soft, hard))
        achieved["rlimits"] = True
        for name in [name for name in sys.modules if name.partition(".")[0] in ("ctypes", "_ctypes")]:
            del sys.modules[name]  # so that `import ctypes` goes through the hook
        del libc, ctypes
        _install_audit_hook(work, limits.network)
        achieved["audit_hook"] = True
    except Exception as e:
        print(f"sandbox setup failed: {e!r}", file=sys.stderr)
        sys.exit(_SETUP_FAILED)
    if mode == "probe":
        print(json.dumps(achieved))
        return
    sys.argv = [program := os.path.join(work, "program.py")]
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # the traceback from the program's first frame, not ours
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != program:
            tb = tb.tb_next
        _write_last("".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__)),
                    limits.max_output_bytes)
        sys.exit(1)


def _write_last(text: str, limit: int) -> None:
    """Write `text` (a traceback) at the end of stderr even when stderr is full (RLIMIT_FSIZE): cut
    what came before it, so that the tail the parent keeps ends with it."""
    data = text.encode("utf-8", "replace")[-limit:]
    try:
        sys.stderr.flush()
    except OSError:
        pass
    try:
        if os.lseek(2, 0, os.SEEK_END) + len(data) > limit:
            os.ftruncate(2, limit - len(data))
            os.lseek(2, 0, os.SEEK_END)
        os.write(2, data)
    except OSError:  # stderr is not our file after all
        sys.stderr.write(text)


def _drop_to_nobody(libc, work: str, max_output_bytes: int) -> bool:
    """Become uid/gid 65534 (see the module docstring, 2.); False where it cannot be done safely."""
    hidden = _hidden_dirs()
    if any(work.startswith(blocker + "/") for blocker in hidden):
        return False
    private = libc.unshare(CLONE_NEWNS) == 0 and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
    if hidden and not private:
        return False  # as nobody, the program could not import the standard library
    if private:
        os.umask(0o022)
        for blocker, dirs in hidden.items():  # bind each dir aside, cover blocker, move the binds back
            stages = [(tempfile.mkdtemp(dir=os.path.dirname(work)), d) for d in dirs]
            for stage, d in stages:
                _mount(libc, d, stage, None, MS_BIND | MS_REC)
            _mount(libc, "tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            for stage, d in stages:
                os.makedirs(d, exist_ok=True)
                _mount(libc, stage, d, None, MS_MOVE)
        with open(program := os.path.join(work, "program.py"), "rb") as f:
            source = f.read()
        _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={256 * max_output_bytes},nr_inodes=4096,mode=0700,uid={NOBODY},gid={NOBODY}")
        os.chdir(work)
        with open(program, "wb") as f:
            f.write(source)
    else:
        os.chown(work, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return True


def _hidden_dirs() -> dict[str, list[str]]:
    """sys.path directories that uid 65534 could not reach, by the topmost directory on the way that
    others may not pass through (no x bit)."""
    hidden: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)}):
        if any(path.startswith(d + "/") for dirs in hidden.values() for d in dirs):
            continue
        parts = path.split("/")
        above = ("/".join(parts[:i]) for i in range(2, len(parts)))  # /a, /a/b, ... (not path itself)
        if blocker := next((a for a in above if not os.stat(a).st_mode & 0o001), None):
            hidden.setdefault(blocker, []).append(path)
    return hidden


def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")


_PROCESS_EVENTS = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                             "subprocess.Popen", "pty.spawn", "os.startfile"})
_CHANGE_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate"})
_METADATA_EVENTS = frozenset({"os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr", "os.chflags"})
_NATIVE_MODULES = frozenset({"ctypes", "_ctypes", "_cffi_backend", "_testcapi", "_testinternalcapi"})
_WATCHED = _PROCESS_EVENTS | _CHANGE_EVENTS | _METADATA_EVENTS | {
    "open", "import", "os.chdir", "os.symlink", "os.link", "os.kill", "os.killpg", "resource.prlimit",
    "object.__setattr__", "object.__delattr__"}
_UNAUDITED = ("pidfd_open", "sched_setaffinity", "setpriority", "mkfifo", "mknod")  # os functions without an event


def _install_audit_hook(root: str, network: bool) -> None:
    """Everything the hook reads is bound as a default argument, not looked up in globals or builtins
    that the program could rebind; the defaults and code themselves change only by an audited
    assignment (to `__defaults__`, `__code__`), which the hook refuses for its own functions."""
    import _posixsubprocess
    import _signal
    import posix

    def outside(path, root=root, Blocked=SandboxBlocked, type=type, str=str, bytes=bytes, int=int):
        """`path` as written if it may lead outside `root`, else None (inside, or an open descriptor).
        Relative paths are inside: the working directory cannot leave root, '..' counts as outside,
        and no link can be made, so no component inside root is a symlink out of it."""
        if type(path) is int:
            return None
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        elif type(path) is not str:  # Python hands the hook converted paths; anything else is suspect
            raise Blocked(f"blocked: a path given as {type(path).__name__}")
        parts = path.split("/")
        if ".." in parts:
            return path
        if not path.startswith("/"):
            return None
        normal = "/" + "/".join([p for p in parts if p and p != "."])
        return None if normal == root or normal.startswith(root + "/") or normal == "/dev/null" else path

    def hook(event, args, outside=outside, network=network, Blocked=SandboxBlocked, BlockedImport=SandboxBlockedImport,
             watched=_WATCHED, process_events=_PROCESS_EVENTS, change_events=_CHANGE_EVENTS,
             metadata_events=_METADATA_EVENTS, native_modules=_NATIVE_MODULES, getpid=posix.getpid,
             getpgrp=posix.getpgrp, write_flags=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
             type=type, int=int, guarded=()):
        if event not in watched:
            if event.startswith("ctypes."):
                raise Blocked("blocked: loading native code (ctypes, cffi) is not allowed")
            if event.startswith("socket.") and not network and not (event == "socket.__new__" and args[1] == 1):
                raise Blocked("blocked: network access is not allowed")  # 1 = AF_UNIX, for local socket pairs
        elif event == "open":  # (path, mode, flags); mode None from os.open, whose directory fds allow openat(2)
            if (args[2] & write_flags or args[1] is None) and (where := outside(args[0])) is not None:
                what = "writing" if args[2] & write_flags else "os.open"
                raise Blocked(f"blocked: {what} outside the sandbox directory ({where})")
        elif event == "import":
            if (name := args[0].partition(".")[0]) in native_modules:
                raise BlockedImport("blocked: loading native code (ctypes, cffi) is not allowed")
            if name == "_posixsubprocess":
                raise BlockedImport("blocked: starting processes is not allowed")
        elif event in process_events:
            raise Blocked("blocked: starting processes is not allowed")
        elif event in change_events or event in metadata_events:
            if event in metadata_events and type(args[0]) is int:
                raise Blocked("blocked: changing file metadata through a descriptor is not allowed")
            for path in args[:2] if event == "os.rename" else args[:1]:
                if (where := outside(path)) is not None:
                    raise Blocked(f"blocked: changing files outside the sandbox directory ({where})")
        elif event == "os.chdir" and (where := outside(args[0])) is not None:
            raise Blocked(f"blocked: leaving the sandbox directory ({where})")
        elif event in ("os.symlink", "os.link"):
            raise Blocked("blocked: creating links is not allowed")
        elif event in ("os.kill", "os.killpg", "resource.prlimit") and args[0] not in (0, getpid(), getpgrp()):
            raise Blocked("blocked: acting on other processes is not allowed")
        elif event.startswith("object.") and args[0] in guarded:  # __setattr__/__delattr__ on the hook's functions
            raise Blocked("blocked: changing the sandbox's audit hook is not allowed")

    hook.__defaults__ = hook.__defaults__[:-1] + ((hook, outside),)

    def refusal(name: str):
        def refused(*args, **kwargs):
            raise SandboxBlocked(f"blocked: {name} is not allowed")
        return refused

    # Calls without an audit event of their own become refusals. `_posixsubprocess` stays importable
    # (asyncio imports subprocess) with its stub; a fresh copy would fire the "import" event, refused above.
    for module, names in ((_posixsubprocess, ("fork_exec",)), (signal, ("pidfd_send_signal",)),
                          (_signal, ("pidfd_send_signal",)), (os, _UNAUDITED), (posix, _UNAUDITED)):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, refusal(name))
    sys.addaudithook(hook)


if __name__ == "__main__":
    _boot(sys.argv[1], SandboxLimits(**json.loads(sys.argv[2])), sys.argv[3])
