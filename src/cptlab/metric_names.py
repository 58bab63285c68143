"""The names metrics.jsonl is written and read with, in one place: each record's `event`, the metrics
of an `eval` record, the families of a `drift` record and the wall-clock fields. Writers (evaluator,
drift_probe, trainer, continual) and readers (analysis/, report, plots, compare, trackers, export)
import them from here.

A record is one JSON object a line: {"event": EVENT, "stage": ..., ...}.
"""

from __future__ import annotations

# -- events ------------------------------------------------------------------------------------------
RUN_START = "run_start"
"""Once, first: the run's name, base model (provenance, weights sha256), domains, stage plan."""
RUN_END = "run_end"
"""Once, last: seconds and global step of the whole run."""
TRAIN = "train"
"""One per optimizer step: losses, rewards, lengths, method-specific curves (methods.report curves)."""
EVAL = "eval"
"""One per domain per evaluation (stage 0, every eval.every steps, each stage end): EVAL_METRICS."""
DRIFT = "drift"
"""One per stage end (and for the base): DRIFT_FAMILIES/*, with seconds by phase (SECONDS_PREFIX)."""
STAGE_END = "stage_end"
"""One per stage: its domain, method, steps and seconds."""
FAULT = "fault"
"""A numerical fault: the step, what was wrong, and whether it was skipped or stopped the run."""
VERIFIER_ERROR = "verifier_error"
"""A verifier that raised during an evaluation: how often, and the first message."""
EVENTS = (RUN_START, RUN_END, TRAIN, EVAL, DRIFT, STAGE_END, FAULT, VERIFIER_ERROR)

# -- the metrics of an eval record -------------------------------------------------------------------
GREEDY_ACC = "greedy_acc"
"""Share of held-out prompts whose greedy answer is correct (the accuracy matrix R[stage][domain])."""
SAMPLED_ACC = "sampled_acc"
"""Share of correct answers among eval.num_samples samples per prompt at eval.temperature."""
LENIENT_ACC = "lenient_acc"
"""Greedy accuracy reading the answer leniently (the last number or option, any wrapper)."""
FORMAT_RATE = "format_rate"
"""Share of greedy answers that are well formed in the run's answer format."""
MEAN_LENGTH = "mean_length"
"""Mean greedy completion length in tokens."""
EVAL_METRICS = (GREEDY_ACC, LENIENT_ACC, SAMPLED_ACC, FORMAT_RATE, MEAN_LENGTH)

# -- a drift record ----------------------------------------------------------------------------------
DRIFT_FAMILIES = ("param", "response", "artifacts", "general")
"""The prefixes of a drift record's quantities: parameter drift, response drift, artifact rates, the
general probe (`param/rel_l2_base`, `response/kl`, ...)."""
SECONDS_PREFIX = "seconds/"
"""A drift record's seconds by phase (`seconds/param`, `seconds/response`, `seconds/general`)."""

# -- wall clock ----------------------------------------------------------------------------------------
TIMING = frozenset({"seconds", "step_seconds", "rollout_seconds", "tokens_per_second", "warmup_seconds",
                    "eval_seconds"})
"""Fields that measure wall-clock time: they differ between two runs that are otherwise identical."""


def is_timing(key: str) -> bool:
    """Whether a record's field measures wall-clock time (TIMING, or a phase's SECONDS_PREFIX)."""
    return key in TIMING or key.startswith(SECONDS_PREFIX)
