"""cptlab.distributed on CPU: two gloo ranks spawned by torch.multiprocessing, checked against the
single-process computation over the whole batch."""

import os

import pytest
import torch
from torch import nn

from cptlab import distributed as D
from cptlab.errors import ConfigError
from helpers import TwoDtypes, free_port, spawn, two_dtypes_batch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _check_grads(info):
    x, y = two_dtypes_batch()
    # single process, whole batch; the rank-0-only layer sees only the first half's rows
    full = TwoDtypes()
    out = full(x, use_extra=False) + torch.cat([full.only_rank0(x[:4]), torch.zeros(4, 2)]).double()
    ((out - y) ** 2).mean().backward()

    local = TwoDtypes()
    half = D.share(list(range(8)), info.rank, info.world_size, "method.prompts_per_step")
    xs, ys = x[half], y[half]
    ((local(xs, use_extra=info.rank == 0) - ys) ** 2).mean().backward()
    D.all_reduce_grads(local.parameters())
    for (name, p), q in zip(local.named_parameters(), full.parameters()):
        if name.startswith("unused"):
            assert p.grad is None and q.grad is None
        else:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow  # two spawned ranks
def test_all_reduce_grads_of_two_halves_equals_full_batch_gradient():
    spawn(_check_grads, timeout_minutes=1)


def _check_sum(info):
    # each rank's loss units: rank 0 holds 9 tokens in 2 sequences, rank 1 one token in 1
    local = {"tokens": 9.0, "sequences": 2.0} if info.rank == 0 else {"tokens": 1.0, "sequences": 1.0}
    assert D.all_reduce_sum(local) == {"tokens": 10.0, "sequences": 3.0}


@pytest.mark.slow  # two spawned ranks
def test_all_reduce_sum_gives_every_rank_the_global_loss_units():
    spawn(_check_sum, timeout_minutes=1)


def _check_collectives(info):
    r = info.rank
    # ragged dim 0: rank 0 has 3 rewards, rank 1 has 1
    rewards = torch.tensor([0.0, 1.0, 0.5]) if r == 0 else torch.tensor([1.0])
    assert D.all_gather_tensor(rewards).tolist() == [0.0, 1.0, 0.5, 1.0]
    assert D.all_gather_tensor(torch.full((2, 3), float(r))).tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
    assert D.broadcast_object({"stop": r == 0} if r == 0 else None) == {"stop": True}
    assert D.broadcast_object(f"from {r}", src=1) == "from 1"
    stats = {"reward": float(r), "only_here": 7.0} if r == 0 else {"reward": 3.0}
    assert D.all_reduce_mean(stats) == {"reward": 1.5, "only_here": 7.0}
    assert D.any_rank(r == 1) is True and D.any_rank(False) is False
    D.barrier()


@pytest.mark.slow  # two spawned ranks
def test_gather_broadcast_mean_and_any_rank_across_two_ranks():
    spawn(_check_collectives, timeout_minutes=1)


def test_share_is_contiguous_even_when_asked_and_covers_every_item():
    items = list(range(8))
    parts = [D.share(items, r, 4, "method.prompts_per_step") for r in range(4)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert D.share(items, 0, 1) == items
    with pytest.raises(ConfigError) as err:
        D.share(list(range(6)), 0, 4, "method.prompts_per_step")
    message = str(err.value)
    assert "method.prompts_per_step" in message and "6" in message and "4 ranks" in message
    assert "\n" not in message
    # without a field (domains, probes): uneven shares, differing by at most one, together every item once
    uneven = [D.share(list(range(6)), r, 4) for r in range(4)]
    assert uneven == [[0], [1, 2], [3], [4, 5]]
    assert [D.share(list(range(3)), r, 4) for r in range(4)] == [[], [0], [1], [2]]
    with pytest.raises(ValueError, match="rank 4"):
        D.share(items, 4, 4)


def test_world_of_one_creates_no_group_and_every_call_is_a_no_op(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    info = D.init_from_env("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.backend, info.is_main) == (0, 1, 0, None, True)
    assert info.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)

    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    D.all_reduce_grads(layer.parameters())
    assert all(torch.equal(p.grad, b) for p, b in zip(layer.parameters(), before))
    rewards = torch.tensor([1.0, 0.0])
    assert D.all_gather_tensor(rewards) is rewards
    assert D.all_reduce_mean({"loss": 2.0}) == {"loss": 2.0}
    assert D.all_reduce_sum({"tokens": 5.0}) == {"tokens": 5.0}
    assert D.broadcast_object([1, 2]) == [1, 2]
    assert D.any_rank(True) is True
    D.barrier()
    D.destroy()

    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: still no group
    assert D.init_from_env("cpu").backend is None and not torch.distributed.is_initialized()


def test_prompts_per_step_must_split_over_the_ranks():
    from cptlab.config import load_config
    from cptlab.resume import check_world_size
    from cptlab.errors import ConfigError

    cfg = load_config("smoke", ["method.prompts_per_step=3"])
    check_world_size(cfg, 1)
    check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.method\.prompts_per_step.*2 torchrun ranks"):
        check_world_size(cfg, 2)


@pytest.mark.slow
def test_torchrun_two_ranks_write_one_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m cptlab run smoke`: rank 0 alone writes the run directory, every
    step is logged once, every evaluation once per domain, and a checkpoint is there."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cptlab", "run", "smoke", "--out", str(out), "run.report=false", "eval.drift=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run written to") == 1  # the other rank's console is quiet
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [(r["stage"], r["step"]) for r in train] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    evals = [(r["stage"], r["step"], r["domain"]) for r in records if r["event"] == "eval"]
    assert len(evals) == len(set(evals)) > 0
    assert sum(r["event"] == "run_end" for r in records) == 1
    assert any((out / "checkpoints").iterdir())
