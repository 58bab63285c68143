"""The sandbox for model-written programs (cptlab.verifiers.sandbox): each hostile program ends with the
right status and a reason line, leaves nothing behind, and the test process goes on. Protections that
need root (uid drop, network namespace) are checked where isolation() says they hold; the outcome of
every other test holds either way (the audit hook blocks what the kernel would not)."""

import os
import sys
import time

import pytest

from cptlab.verifiers.sandbox import SandboxLimits, isolation, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
FAST = SandboxLimits(wall_seconds=3.0)
ESCAPE = "/tmp/cptlab_sandbox_escape_test"


def sandbox_processes() -> list[int]:
    """Pids of live processes started by the sandbox (their command line names its temp dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"cptlab_sandbox_" in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_passing_program_captures_stdout():
    result = run_program("print(sum(range(10)))\nprint('done')", limits=FAST)
    assert (result.status, result.returncode, result.reason) == ("ok", 0, "")
    assert result.stdout == "45\ndone\n"
    assert result.stderr == ""


def test_assertion_failure_shows_the_programs_own_traceback():
    source = "def add(a, b):\n    return a - b\n\n\nassert add(2, 3) == 5, 'add is wrong'\n"
    result = run_program(source, limits=FAST)
    assert result.status == "failed" and result.returncode == 1
    assert result.reason == "AssertionError: add is wrong"
    assert "assert add(2, 3) == 5, 'add is wrong'" in result.stderr
    assert 'program.py", line 5, in <module>' in result.stderr
    assert "runpy" not in result.stderr  # the sandbox's own frames are left out


def test_uncaught_exception_and_exit_code():
    assert run_program("raise ValueError('bad input')", limits=FAST).reason == "ValueError: bad input"
    result = run_program("import sys\nsys.exit(3)", limits=FAST)
    assert (result.status, result.returncode, result.reason) == ("failed", 3, "exited with code 3")


def test_infinite_loop_times_out_on_the_wall_clock():
    start = time.monotonic()
    result = run_program("while True:\n    pass", limits=FAST)
    assert time.monotonic() - start < FAST.wall_seconds + 2
    assert result.status == "timeout"
    assert result.reason == "timed out after 3 s (wall clock)"
    assert sandbox_processes() == []


def test_cpu_limit_counts_as_timeout():
    result = run_program("while True:\n    pass", limits=SandboxLimits(wall_seconds=8.0, cpu_seconds=1))
    assert result.status == "timeout"
    assert result.reason == "timed out: exceeded the CPU time limit (1 s)"


def test_fork_bomb_is_blocked_and_leaves_no_process():
    result = run_program("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "blocked: starting processes is not allowed"
    assert sandbox_processes() == []


def test_subprocess_is_blocked():
    result = run_program("import subprocess\nsubprocess.run(['sleep', '100'])", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "blocked: starting processes is not allowed"
    assert result.seconds < FAST.wall_seconds
    assert sandbox_processes() == []


def test_huge_allocation_is_a_memory_error():
    result = run_program("x = bytearray(10 * 1024**3)", limits=FAST)
    assert result.status == "memory"
    assert result.reason == "exceeded the memory limit (1024 MB)"
    assert "MemoryError" in result.stderr


def test_writing_outside_the_sandbox_is_blocked():
    if os.path.exists(ESCAPE):
        os.remove(ESCAPE)
    result = run_program(f"open({ESCAPE!r}, 'w').write('escaped')", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == f"blocked: writing outside the sandbox directory ({ESCAPE})"
    assert not os.path.exists(ESCAPE)
    result = run_program("import os\nos.chdir('/tmp')\nopen('cptlab_sandbox_escape_test', 'w')", limits=FAST)
    assert result.reason == "blocked: leaving the sandbox directory (/tmp)"
    assert not os.path.exists(ESCAPE)


def test_files_inside_the_sandbox_work_and_are_removed():
    source = ("import os, pathlib, tempfile\n"
              "pathlib.Path('out').mkdir()\n"
              "pathlib.Path('out/a.txt').write_text('hello')\n"
              "fd, name = tempfile.mkstemp()\n"
              "os.write(fd, b'x')\n"
              "print(os.getcwd())\n"
              "print(open('out/a.txt').read(), os.path.dirname(name) == os.getcwd())\n")
    result = run_program(source, limits=FAST)
    assert result.status == "ok", result.stderr
    cwd, line = result.stdout.splitlines()
    assert line == "hello True"
    assert "cptlab_sandbox_" in cwd and not os.path.exists(cwd)


def test_network_is_blocked():
    source = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))"
    result = run_program(source, limits=FAST)
    assert result.status != "ok"
    assert "network" in result.reason and "network" in result.stderr


def test_signalling_the_parent_is_blocked():
    result = run_program("import os\nos.kill(os.getppid(), 0)", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "blocked: acting on other processes is not allowed"


def test_ctypes_is_blocked():
    result = run_program("import ctypes\nctypes.CDLL(None).system(b'true')", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "blocked: loading native code (ctypes, cffi) is not allowed"


def test_output_flood_is_truncated():
    limits = SandboxLimits(wall_seconds=3.0, max_output_bytes=10_000)
    result = run_program("while True:\n    print('x' * 1000)", limits=limits)
    assert result.status == "failed"
    assert result.reason == "wrote more than the output limit (10000 bytes) to stdout, stderr or a file"
    assert 0 < len(result.stdout.encode()) <= 10_000
    assert set(result.stdout) <= {"x", "\n"}


def test_stderr_keeps_the_tail():
    limits = SandboxLimits(wall_seconds=3.0, max_output_bytes=1000)
    result = run_program("import sys\nsys.stderr.write('a' * 900)\nraise KeyError('last')", limits=limits)
    assert len(result.stderr.encode()) <= 1000
    assert result.stderr.rstrip().endswith("KeyError: 'last'")


def test_stdin_is_passed_through():
    result = run_program("print(input()[::-1])\nprint(input())", limits=FAST, stdin="hello\nworld\n")
    assert result.status == "ok"
    assert result.stdout == "olleh\nworld\n"


def test_limits_hold_inside_the_child():
    source = ("import os, resource\n"
              "for r in ('CPU', 'AS', 'FSIZE', 'NPROC', 'CORE'):\n"
              "    print(r, *resource.getrlimit(getattr(resource, 'RLIMIT_' + r)))\n"
              "print('uid', os.getuid())\n"
              "print('interfaces', *sorted(line.split(':')[0].strip() for line in open('/proc/self/net/dev')\n"
              "      if ':' in line))\n")
    limits = SandboxLimits(wall_seconds=3.0, cpu_seconds=2, memory_mb=256, max_processes=8, max_output_bytes=5000)
    result = run_program(source, limits=limits)
    assert result.status == "ok", result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["CPU"] == "2 3"
    assert lines["AS"] == f"{256 << 20} {256 << 20}"
    assert (lines["FSIZE"], lines["NPROC"], lines["CORE"]) == ("5000 5000", "8 8", "0 0")
    enforced = isolation()
    if enforced["uid_drop"]:
        assert lines["uid"] == "65534"
    if enforced["network_namespace"]:
        assert lines["interfaces"] == "lo"


def test_isolation_reports_what_is_enforced():
    enforced = isolation()
    assert set(enforced) == {"network_namespace", "uid_drop", "audit_hook", "rlimits"}
    assert enforced["audit_hook"] and enforced["rlimits"]
    if os.geteuid() != 0:
        assert not enforced["uid_drop"]


def test_run_programs_keeps_order_and_runs_concurrently():
    sources = [f"import time\ntime.sleep(1)\nprint({i})" for i in range(8)]
    start = time.monotonic()
    results = run_programs(sources, limits=FAST, workers=8)
    assert time.monotonic() - start < 6
    assert [r.status for r in results] == ["ok"] * 8
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
    assert run_programs([], limits=FAST) == []


def test_a_sandbox_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    result = run_program("print(1)", limits=FAST)
    assert result.status == "error" and result.returncode is None
    assert result.reason.startswith("the sandbox failed to start")


def test_limits_name_a_bad_field():
    with pytest.raises(ValueError, match="SandboxLimits.wall_seconds = 0"):
        SandboxLimits(wall_seconds=0)
