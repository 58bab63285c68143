"""The run's evaluator: every configured domain, at stage 0, every `eval.every` steps and at each stage
end. It owns what an evaluation writes: the `eval` records (one per domain), `verifier_error` records,
the samples file and the per-prompt record (evals/stage{S}-step{K}.json, written once).

Under torchrun every rank evaluates its share of the domains (distributed.share); each domain's
samples are seeded by the domain alone, so the results are those of one process. Rank 0 gathers,
logs and returns them; the other ranks return {}.
"""

from __future__ import annotations

import time

from . import distributed as dist
from .analysis import per_prompt
from .config import Config, resolve_eval
from .evaluate import evaluate_all
from .rollout import SamplingSpec, prepare_generation
from .store import RunStore
from .tasks import eval_set_identity
from .trainer import derive_seed
from .ui import console, eval_table, progress
from .metric_names import EVAL, VERIFIER_ERROR


class Evaluator:
    def __init__(self, cfg: Config, store: RunStore, info: dist.DistInfo, domains: list[str], tokenizer):
        self.cfg, self.store, self.info, self.domains, self.tokenizer = cfg, store, info, domains, tokenizer
        self.ecfg = resolve_eval(cfg)
        self.spec = SamplingSpec.for_eval(self.ecfg, cfg.rollout)

    def __call__(self, model, stage: int, stage_name: str, step: int, global_step: int, final: bool) -> dict:
        """Evaluate `model` on every domain; returns {domain: EvalResult} on rank 0 ({} elsewhere). Call
        on every rank."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prepare_generation(model, self.spec)  # a sharded model's weights, gathered by every rank here
        mine = dist.share(self.domains, self.info.rank, self.info.world_size)
        with progress(f"eval after {stage_name} step {step}", len(mine)) as advance:
            results = evaluate_all(model, self.tokenizer, mine, self.ecfg, cfg.prompt, self.spec,
                                   seed=derive_seed(cfg.run.seed, stage, step, "eval"),
                                   on_domain=lambda name: advance(info=name))
        gathered = {name: r for part in dist.gather_objects(results) for name, r in part.items()}
        if not self.info.is_main:
            return {}
        results = {name: gathered[name] for name in self.domains}
        seconds = time.perf_counter() - t0
        for name, r in results.items():
            self.store.log(EVAL, stage=stage, stage_name=stage_name, step=step, global_step=global_step,
                           final=final, domain=name, eval_seconds=seconds, **r.metrics())
            if r.verifier_errors:
                self.store.log(VERIFIER_ERROR, stage=stage, step=step, domain=name, count=r.verifier_errors,
                               first=r.verifier_error)
        self.store.write_samples(f"stage{stage}-step{step}", {n: r.samples for n, r in results.items()})
        identities = {n: eval_set_identity(n, cfg.eval.num_prompts, cfg.prompt.style, cfg.prompt.answer_format)
                      for n in results}
        self.store.write_once(per_prompt.file_name(stage, step), per_prompt.encode(
            stage, stage_name, step, global_step, final, results, identities, cfg.eval.num_samples))
        if final:
            console.print(eval_table(f"after stage {stage} ({stage_name})", {n: r.metrics() for n, r in results.items()}))
        return results


__all__ = ["Evaluator"]
