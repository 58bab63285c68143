"""Several processes on CPU (gloo): the overlapped gradient all-reduce, FSDP2 (`distributed.strategy:
fsdp`) against ddp and one process, an FSDP checkpoint resumed, and evaluation split over the ranks.

Each test spawns its ranks with torch.multiprocessing (as torchrun would set them up) and checks values
against the single-process computation of the same batch."""

import copy
import os
from pathlib import Path

import pytest
import torch

from cptlab import distributed as D
from cptlab.config import GRPOConfig, MethodConfig, resolve_eval
from helpers import TwoDtypes, free_port, method_and_batch, new_tiny_model, noisy_model, spawn, two_dtypes_batch, sdpo_config

pytestmark = pytest.mark.slow  # every test spawns its ranks or runs torchrun: seconds to a minute each on two cores


# ------------------------------------------------------------------ overlapped all-reduce (ddp)


class UnusedFirst(TwoDtypes):
    """TwoDtypes with the unused layer registered first: the backward reaches it last (never)."""

    def __init__(self):
        super().__init__()
        unused = self.unused
        del self.unused
        layers = dict(self._modules)
        self._modules.clear()
        self.unused = unused
        self._modules.update(layers)


def _check_overlapped_sync(info):
    x, y = two_dtypes_batch()
    rows = D.share(list(range(8)), info.rank, info.world_size, "method.prompts_per_step")

    def backward(model, sync):
        """Two micro-batches; the rank-0-only layer gets a gradient on rank 0 alone."""
        for i, part in enumerate([rows[:2], rows[2:]]):
            if sync is not None:
                sync.before_backward(last=i == 1)
            ((model(x[part], use_extra=info.rank == 0) - y[part]) ** 2).sum().backward()

    reference = UnusedFirst()
    backward(reference, None)
    D.all_reduce_grads(reference.parameters())

    model = UnusedFirst()
    sync = D.GradientSync(model.parameters(), bucket_mb=1e-6)  # one byte: a bucket per tensor
    # reverse order: only_rank0 (bias, weight), b, a, unused; float64 and float32 never share a bucket
    assert [len(b) for b in sync.buckets] == [1] * 8 and sync.buckets[2][0] is model.b.bias
    launched = []
    original = sync._launch
    sync._launch = lambda: (launched.append(len(sync._launched)), original())
    backward(model, sync)
    in_backward = len(launched)
    sync.finish()
    assert launched == list(range(8))  # in bucket order on every rank
    # rank 0 sent the buckets of only_rank0, b and a while the backward ran, rank 1 (no gradient for
    # only_rank0: bucket 0 never completes) all at finish; the unused layer's at finish on both
    assert in_backward == (6 if info.rank == 0 else 0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith("unused"):
            assert p.grad is None and q.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)  # the same sums exactly
    sync.close()
    assert not sync.hooks


def test_overlapped_bucketed_all_reduce_equals_one_all_reduce_after_the_backward():
    spawn(_check_overlapped_sync, world=2)


# ------------------------------------------------------------------ FSDP against ddp and one process

LR = 1e-3


def _one_step(model, method, batch, micro: int, sync):
    from cptlab.optim import make_optimizer
    from cptlab.step import train_step

    optimizer = make_optimizer(model, LR, 0.0)
    result = train_step(method, model, optimizer, batch, micro_batch_size=micro, grad_clip=1.0, sync=sync)
    method.after_batch()
    return optimizer, result.stats


def _full(model) -> dict:
    from cptlab.sharding import full_state_dict

    return {k: v.detach().clone() for k, v in full_state_dict(model).items()}


def _check_fsdp_against_ddp_and_one_process(info, name: str, mcfg: MethodConfig):
    from cptlab.methods import build_method
    from cptlab.sharding import full_state_dict, shard
    from cptlab.variants import SHARDED, variant_of
    from torch.distributed.tensor import DTensor

    model = new_tiny_model().train()
    method, batch = method_and_batch(model, mcfg)  # the same batch on every rank (seeded)
    ctx = method.ctx
    n = len(batch) // info.world_size
    local = batch.select(slice(info.rank * n, (info.rank + 1) * n))

    one = copy.deepcopy(model)  # one process, the whole batch
    one_method = build_method(mcfg, ctx, one)
    _, one_stats = _one_step(one, one_method, batch, 0, None)

    ddp = copy.deepcopy(model)
    ddp_method = build_method(mcfg, ctx, ddp)
    ddp_sync = D.GradientSync(ddp.parameters(), bucket_mb=0.01)
    _, ddp_stats = _one_step(ddp, ddp_method, local, 3, ddp_sync)

    shard(model)
    assert variant_of(model) is SHARDED and all(isinstance(p, DTensor) for p in model.parameters())
    fsdp_method = build_method(mcfg, ctx, model)  # an SDPO teacher: a sharded copy
    _, fsdp_stats = _one_step(model, fsdp_method, local, 3, D.gradient_sync(model))

    expected = one.state_dict()
    changed = max(float((expected[k] - v).abs().max()) for k, v in new_tiny_model().state_dict().items())
    assert changed > LR / 2, "the step moved nothing: equality would prove nothing"
    for what, got, stats in (("ddp", ddp.state_dict(), ddp_stats), ("fsdp", full_state_dict(model), fsdp_stats)):
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=LR / 200, msg=f"{name} {what} {k}")
        assert stats["grad_norm"] == pytest.approx(one_stats["grad_norm"], rel=1e-4), what
    if mcfg.name == "sdpo":  # the EMA teacher followed the same student
        teacher = full_state_dict(fsdp_method.teacher.copy)
        for k, v in one_method.teacher.copy.state_dict().items():
            torch.testing.assert_close(teacher[k], v, rtol=1e-5, atol=LR / 200, msg=f"teacher {k}")


FSDP_CASES = {
    "sdpo-2": (2, MethodConfig(name="sdpo", sdpo=sdpo_config(demo_source="reference", teacher_mode="ema",
                                                             ema_rate=0.5))),
    "grpo-4": (4, MethodConfig(name="grpo", grpo=GRPOConfig(loss_type="bnpo", beta=0.1))),
}


@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_fsdp_step_equals_ddp_and_one_process(case):
    """One optimizer step (micro-batches of 3 rows, AdamW, clipping, the EMA teacher) on 2 or 4 ranks
    holding shards of the weights, of their gradients and of AdamW's state gives the weights (and
    gradient norm, and teacher) of one process stepping on the whole batch; so does ddp."""
    world, mcfg = FSDP_CASES[case]
    spawn(_check_fsdp_against_ddp_and_one_process, case, mcfg, world=world)


def _check_fsdp_with_gradient_checkpointing(info):
    from cptlab.methods import build_method
    from cptlab.sharding import full_state_dict, shard
    from cptlab.variants import enable_gradient_checkpointing, gradient_checkpointing

    mcfg = MethodConfig(name="grpo")
    model = new_tiny_model().train()
    method, batch = method_and_batch(model, mcfg)
    n = len(batch) // info.world_size
    local = batch.select(slice(info.rank * n, (info.rank + 1) * n))
    one = copy.deepcopy(model)  # one process, no checkpointing, the whole batch
    _, one_stats = _one_step(one, build_method(mcfg, method.ctx, one), batch, 0, None)
    enable_gradient_checkpointing(model)  # as models.py does it: before the model is sharded
    shard(model)
    assert gradient_checkpointing(model)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    _, stats = _one_step(model, build_method(mcfg, method.ctx, model), local, 4, D.gradient_sync(model))
    assert calls == [True] * 4  # two micro-batches of 4 rows: each layer forward ran again in the backward
    got = full_state_dict(model)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=LR / 200, msg=k)
    assert stats["grad_norm"] == pytest.approx(one_stats["grad_norm"], rel=1e-4)


def test_fsdp_step_with_gradient_checkpointing_equals_one_process_without():
    """model.gradient_checkpointing under FSDP2 (applied before sharding, as a run does): the recompute
    happens, and the step's weights and gradient norm are one process's without checkpointing."""
    spawn(_check_fsdp_with_gradient_checkpointing, world=2)


# ------------------------------------------------------------------ an FSDP checkpoint, resumed


def _open_store(info, root):
    from cptlab.config import load_config, to_dict
    from cptlab.store import FollowerStore, RunStore

    cfg = load_config("smoke", ["distributed.strategy=fsdp"])
    if info.is_main:
        store = RunStore.create(root, to_dict(cfg))
    D.barrier()
    return cfg, store if info.is_main else FollowerStore.open(root)


def _check_fsdp_resume(info, root):
    from cptlab.checkpoint import load_checkpoint, save_checkpoint
    from cptlab.methods import build_method
    from cptlab.optim import make_optimizer
    from cptlab.sharding import shard
    from cptlab.step import train_step

    _, store = _open_store(info, root)
    mcfg = MethodConfig(name="sdpo", sdpo=sdpo_config(demo_source="reference", teacher_mode="ema", ema_rate=0.3))
    model = new_tiny_model().train()
    method, batch = method_and_batch(model, mcfg)
    n = len(batch) // info.world_size
    halves = [batch.select(slice(info.rank * n + s, info.rank * n + s + n // 2)) for s in (0, n // 2)]
    start = copy.deepcopy(model)

    def step(model, method, optimizer, part):
        sync = D.gradient_sync(model)
        train_step(method, model, optimizer, part, grad_clip=1.0, sync=sync)
        method.after_batch()

    shard(model)
    method = build_method(mcfg, method.ctx, model)
    optimizer = make_optimizer(model, LR, 0.01)
    step(model, method, optimizer, halves[0])
    save_checkpoint(store, "stage1-step1", dict(stage=1, step=1, global_step=1, stage_done=False, order=2),
                    model, optimizer, method)
    D.barrier()
    step(model, method, optimizer, halves[1])  # uninterrupted: the second step
    uninterrupted, teacher = _full(model), _full(method.teacher.copy)

    resumed = shard(copy.deepcopy(start))  # a new process would rebuild the base weights, then load
    resumed_method = build_method(mcfg, method.ctx, resumed)
    resumed_optimizer = make_optimizer(resumed, LR, 0.01)
    path = store.checkpoint_dirs()[-1]
    assert path.name == "stage1-step1" and (path / "optimizer.pt").exists() and (path / "teacher.safetensors").exists()
    load_checkpoint(path, resumed, resumed_optimizer, resumed_method)
    step(resumed, resumed_method, resumed_optimizer, halves[1])
    for k, v in uninterrupted.items():
        torch.testing.assert_close(_full(resumed)[k], v, rtol=0, atol=0, msg=k)
    for k, v in teacher.items():
        torch.testing.assert_close(_full(resumed_method.teacher.copy)[k], v, rtol=0, atol=0, msg=f"teacher {k}")
    moved = max(float((uninterrupted[k] - v).abs().max()) for k, v in start.state_dict().items())
    assert moved > LR, "two steps moved nothing: equality would prove nothing"
    store.close()


def test_fsdp_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    """Weights, AdamW state and the EMA teacher saved as full state dicts by 2 FSDP ranks and loaded into
    a freshly sharded model: the next step gives exactly the weights (and teacher) of the run that went
    on without stopping."""
    spawn(_check_fsdp_resume, tmp_path / "run", world=2)


# ------------------------------------------------------------------ evaluation split over the ranks


def _check_split_evaluation(info, root, strategy):
    from cptlab.evaluator import Evaluator
    from cptlab.config import eval_domains
    from cptlab.evaluate import evaluate_all
    from cptlab.models import build_tokenizer
    from cptlab.rollout import SamplingSpec
    from cptlab.sharding import shard
    from cptlab.trainer import derive_seed

    import zlib

    import cptlab.evaluate
    from cptlab.tasks import Verdict

    def by_text(examples, texts, style):  # a random model solves nothing: score texts, so samples count
        hits = [zlib.crc32(text.encode()) % 3 == 0 for text in texts]
        return [Verdict(float(hit), hit, True, text, "") for hit, text in zip(hits, texts)]

    cptlab.evaluate.verify_batch = by_text
    cfg, store = _open_store(info, root)
    cfg.distributed.strategy = strategy
    domains = eval_domains(cfg)
    tokenizer = build_tokenizer()
    model = noisy_model(tokenizer, scale=0.2)
    ecfg = resolve_eval(cfg)
    alone = evaluate_all(model, tokenizer, domains, ecfg, cfg.prompt,
                         SamplingSpec.for_eval(ecfg, cfg.rollout), seed=derive_seed(cfg.run.seed, 1, 2, "eval"))
    evaluate = Evaluator(cfg, store, info, domains, tokenizer)
    results = evaluate(shard(model) if strategy == "fsdp" else model, 1, "arithmetic", 2, 2, final=False)
    if not info.is_main:
        assert results == {}
        return
    assert list(results) == domains and len(domains) == 3
    for name, r in alone.items():
        assert results[name].metrics() == r.metrics() and results[name].per_prompt == r.per_prompt, name
        assert results[name].sampled_hits == r.sampled_hits and results[name].texts == r.texts, name
    assert all(0 < r.sampled_acc < 1 for r in alone.values())  # the sampled texts themselves are compared
    records = [line for line in (root / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(records) == 3
    store.close()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_split_over_ranks_equals_one_process(tmp_path, strategy):
    """Two ranks evaluate two and one of the three domains (each domain's samples are seeded by the
    domain alone); rank 0 logs exactly what one process evaluating all three computes."""
    spawn(_check_split_evaluation, tmp_path / "run", strategy, world=2)


# ------------------------------------------------------------------ torchrun, end to end


def _torchrun(*args):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cptlab", "run", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(run) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    import json

    timing = ("seconds", "tokens_per_second")
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_fsdp_run_resumes_to_the_uninterrupted_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m cptlab run smoke distributed.strategy=fsdp` (GRPO then SDPO with an
    EMA teacher, evaluation and drift split/gathered, checkpoints every 2 steps); the same run resumed from
    its mid-stage-2 checkpoint writes exactly the uninterrupted run's records."""
    import shutil

    full = tmp_path / "full"
    _torchrun("smoke", "--out", str(full), "run.report=false", "run.keep_checkpoints=10", "distributed.strategy=fsdp",
              "warmup.steps=5", "eval.num_prompts=4", "eval.num_samples=1", "eval.probe_per_domain=2")
    records = _records(full)
    train = [(r["stage"], r["step"]) for r in records if r["event"] == "train"]
    assert train == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    evals = [(r["stage"], r["step"], r["domain"]) for r in records if r["event"] == "eval"]
    assert len(evals) == len(set(evals)) == 15 and sum(r["event"] == "drift" for r in records) == 3
    assert any(r["event"] == "train" and r["loss"] != 0 for r in records)  # the SDPO stage learned something

    resumed = Path(shutil.copytree(full, tmp_path / "resumed"))
    for ckpt in (resumed / "checkpoints").iterdir():
        if ckpt.name in ("stage2-step3",):  # the run now stopped after its stage-2 step-2 checkpoint
            shutil.rmtree(ckpt)
    _torchrun("--resume", str(resumed))
    assert _records(resumed) == records
