"""The drift probe: after every stage end (and for the base, stage 0), one `drift` record with how far
the model moved and how its answers changed.

  param/*      parameter drift vs the base and vs the previous stage's end (analysis/drift.py defines
               it; analysis/drift_record.weight_drift computes it in one batched pass on the model's
               device, a LoRA update from its factors)
  response/*   response drift on probe prompts of every domain, model vs base (analysis/response.py)
  artifacts/*  format artifact rates in the stage-end evaluation's answers (analysis/artifacts.py)
  general/*    the general-ability probe, when enabled (analysis/general.py)
  seconds, seconds/{param,response,general}   what the record cost, in total and by phase

It owns the state the record needs across stages: the base weights' snapshot and their cached
spectra, the previous stage end's snapshot (restored on resume), the base's general-probe answers.

Under torchrun rank 0 computes the parameter drift and the probes are split over the ranks
(distributed.share; each rank's share sampled from a generator seeded with its rank too, so the
sampled metrics are another draw of the same estimator when the number of ranks changes; the greedy
ones are equal). A sharded model's snapshot is gathered by every rank, and every rank runs all probes
(their forwards are collectives).
"""

from __future__ import annotations

import time

import torch

from . import distributed as dist
from .analysis.spectra import BaseSpectra
from .config import Config, general_probe_enabled, resolve_eval
from .rollout import SamplingSpec, prepare_generation
from .store import RunStore
from .trainer import derive_seed
from .variants import drift_state, effective_state_dict
from .metric_names import DRIFT


def snapshot(model) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of the weights (never a view of the live parameters: .float().cpu() of a
    float32 CPU tensor is the tensor itself, which would make drift vs the previous stage zero)."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in effective_state_dict(model).items()}


class DriftProbe:
    def __init__(self, cfg: Config, store: RunStore, info: dist.DistInfo, domains: list[str], tokenizer, base,
                 sharded: bool):
        self.cfg, self.store, self.info, self.domains, self.tokenizer = cfg, store, info, domains, tokenizer
        self.base, self.sharded = base, sharded
        self.spec = SamplingSpec.for_eval(resolve_eval(cfg), cfg.rollout)
        self.base_state = snapshot(base)
        self.prev_state: dict | None = None  # the previous stage end's weights (variants.drift_state)
        self.base_spectra = BaseSpectra()  # the base weights' spectra, top vectors and masks, once per run
        self.general_base_answers = None  # the base model's greedy answers to the general probe

    def remember(self, model) -> None:
        """Take `model`'s weights as the previous stage end's (a resumed run's, from its checkpoint)."""
        self.prev_state = drift_state(model, self.base_state)

    def __call__(self, model, stage: int, global_step: int, results: dict) -> None:
        """Write the drift record of `model` at the end of `stage`; `results` are the stage-end
        evaluation's (rank 0's). Call on every rank."""
        from .analysis.artifacts import artifact_stats
        from .analysis.drift_record import weight_drift
        from .analysis.response import drift_metrics, merge_samples, response_samples
        from .prompts import student_prompt
        from .tasks import make_split

        cfg, p = self.cfg, self.cfg.prompt
        t0 = time.perf_counter()
        current = drift_state(model, self.base_state) if self.info.is_main or self.sharded else None
        prepare_generation(model, self.spec)
        prepare_generation(self.base, self.spec)
        probes = [student_prompt(p, ex.question, self.tokenizer) for d in self.domains
                  for ex in make_split(d, "eval", cfg.eval.probe_per_domain, style=p.style,
                                       answer_format=p.answer_format)]
        rank, world = (0, 1) if self.sharded else (self.info.rank, self.info.world_size)
        share = dist.share(probes, rank, world)
        seed = derive_seed(cfg.run.seed, stage, "probe", *([rank] if rank else []))
        part = (response_samples(model, self.base, self.tokenizer, share, self.spec, seed=seed,
                                 answer_format=p.answer_format) if share else {})
        parts = [part] if self.sharded else dist.gather_objects(part)
        t_response = time.perf_counter()
        # a sharded model's forwards are collectives: every rank runs the general probe then, else rank 0
        general = (self.general_probe(model) if general_probe_enabled(cfg) and (self.info.is_main or self.sharded)
                   else None)
        t_general = time.perf_counter()
        if not self.info.is_main:
            return
        resp = drift_metrics(merge_samples(parts))
        drift = weight_drift(self.base_state, current, self.prev_state, device=self.info.device,
                             cache=self.base_spectra)
        t_param = time.perf_counter()
        fields = {f"param/{k}": v for k, v in drift.items()}
        fields.update({f"response/{k}": v for k, v in resp.items()})
        texts = [t for r in results.values() for t in r.texts]
        formats = [r.answer_format for r in results.values() for _ in r.texts]  # a data set may have its own
        fields.update({f"artifacts/{k}": v for k, v in artifact_stats(texts, answer_format=formats).items()})
        if general is not None:
            fields.update({f"general/{k}": v for k, v in general.items()})
        phases = {"seconds/response": t_response - t0, "seconds/general": t_general - t_response,
                  "seconds/param": t_param - t_general}
        self.store.log(DRIFT, stage=stage, global_step=global_step, seconds=time.perf_counter() - t0,
                       **phases, **fields)
        self.prev_state = current

    def general_probe(self, model) -> dict:
        """The general-ability probe; the base's answers are generated once per process and kept."""
        from .analysis.general import general_probe, load_probe, render_prompt

        prompts, text = load_probe()
        rendered = [render_prompt(q, self.tokenizer, self.cfg.prompt.use_chat_template) for q in prompts]
        out, self.general_base_answers = general_probe(model, self.base, self.tokenizer, rendered, text, self.spec,
                                                       base_answers=self.general_base_answers)
        return out


__all__ = ["DriftProbe", "snapshot"]
