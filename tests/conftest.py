from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cptlab.config import ModelConfig
from cptlab.models import build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).eval()


@pytest.fixture(autouse=True)
def builtin_domains_only():
    """Tests that install a config's domains (install_domains, as the entry points that run work do)
    leave them installed; each test starts and ends with the built-in ones only."""
    from cptlab.tasks import install_domains

    install_domains({})
    yield
    install_domains({})


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the whole session: the tiny models' matmuls gain nothing from a second
    thread, and on a two-core machine busy with anything else two threads make them many times slower
    (the fast tier took 231 s with two threads and 67 s with one, one after the other on a loaded box),
    and one thread gives the same bits whatever the machine's core count. A test that needs another
    count sets and restores it itself; spawned ranks and the `cli` fixture's commands keep one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def still_one_thread(one_thread):
    """Back to one thread after each test: a command run in-process without the `cli` fixture (run,
    eval, distance and study set the thread count for the machine) would leave the rest of the session
    on two, many times slower on a busy machine."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def warmup_cache(tmp_path_factory) -> Path:
    """A warm-up cache directory shared by a test module's runs (the base is built once)."""
    return tmp_path_factory.mktemp("warmup-cache")


@pytest.fixture()
def cli(monkeypatch):
    """`cptlab ARGS...` through the real typer app in this process (a subprocess per call would spend
    seconds importing torch; monkeypatched faults reach it); returns a typer.testing Result with
    exit_code, stdout and stderr apart. The command keeps the test's torch thread count.
    helpers.assert_one_line_error checks a refusal: exit 2, one line on stderr, no traceback."""
    import cptlab.cli

    monkeypatch.setattr(cptlab.cli, "_configure_threads", lambda: None)
    runner = CliRunner()
    return lambda *args: runner.invoke(cptlab.cli.app, [str(a) for a in args])
