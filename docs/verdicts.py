"""Every verdict of docs/RESULTS.md, recomputed from the raw records with cptlab.analysis.stats.

    mkdir -p /tmp/rd && for f in docs/data/*.tgz; do tar xzf $f -C /tmp/rd; done
    python docs/verdicts.py /tmp/rd            # prints the table, writes docs/verdicts.json
    python docs/verdicts.py /tmp/rd --results docs/RESULTS.md   # also rewrites RESULTS.md's verdict tables
    python docs/verdicts.py /tmp/rd --check    # exit 1 if verdicts.json or RESULTS.md differ from the data

Each claim is a difference with a stated direction: two arms over seeds (Welch's t interval, exact
permutation p), or one arm's change from its base model (t interval, exact sign-flip p; the base is
one model evaluated once, so the change is a one-sample quantity), or, for a yes/no outcome per seed
(a run collapsed or not), the two arms' counts (Fisher's exact p). Accuracies and their differences
are in points. Each row names its base (a fingerprint of the base model's stage-0 accuracies, which
are deterministic within a study) so that comparisons across bases are visible. The recorded runs
have no per-prompt records, so these intervals hold seed-to-seed noise only.

Multiplicity: every row is one test of a family, one family per model (`family_of`): the 20 rows of
section 1 (SmolLM2-135M: one study on one base) and every row of the 76M model at GPU scale (one
switch, `family_of`, makes it one family of all rows). Holm's step-down
(`cptlab.analysis.stats.holm`) adjusts each row's p (the t test's p behind its interval, Fisher's p
for a yes/no row) over its whole family, and gives each row an alpha: alpha_i = 0.05 / (m - i + 1)
at rank i of the sorted p values while the step-down still rejects, and the alpha of the first
non-rejected rank for that rank and every later one (monotonicity). The row's adjusted interval is
its t interval at level 1 - alpha; it excludes zero exactly where Holm rejects. The verdict rule
reads the adjusted interval: "agrees" only where it excludes zero in the stated direction,
"disagrees" where it excludes zero in the other direction, else "inconclusive". A yes/no row has no
interval: it agrees (disagrees) where its Holm-adjusted Fisher p is below 0.05 and the difference of
the two shares has the stated (the other) sign. `verdict_95` keeps the unadjusted verdict beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics as st
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cptlab.analysis.metrics import (
    average_accuracy, average_accuracy_trained, backward_transfer, forward_transfer, matrix_from_records,
    mean_forgetting,
)
from cptlab.analysis.stats import difference, fisher_exact, holm, one_sample, verdict
from cptlab.store import read_jsonl

UNTRAINED = ("arithmetic", "sorting", "filtering", "counting")
"""The untrained prior domains of the single-stage studies (gcd trained, gcd_ood its OOD variant)."""


@dataclass
class Cell:
    seed: int
    rows: list[dict]

    def evals(self) -> dict[tuple[int, str], float]:
        """(step, domain) -> greedy accuracy; step 0 is the base model."""
        return {(r["step"] if r["stage"] else 0, r["domain"]): r["greedy_acc"]
                for r in self.rows if r["event"] == "eval"}

    def matrix(self):
        return matrix_from_records(self.rows)

    def drift(self, stage: int) -> dict:
        found = [r for r in self.rows if r["event"] == "drift" and r.get("stage") == stage]
        return found[-1] if found else {}

    def base_fingerprint(self) -> str:
        base = sorted((r["domain"], round(r["greedy_acc"], 6))
                      for r in self.rows if r["event"] == "eval" and r["stage"] == 0)
        return hashlib.sha256(json.dumps(base).encode()).hexdigest()[:8]


def load(root: Path, study: str) -> dict[str, list[Cell]]:
    cells = defaultdict(list)
    for path in sorted((root / study).glob("*-s*/metrics.jsonl")):
        variant, seed = path.parent.name.rsplit("-s", 1)
        cells[variant].append(Cell(int(seed), read_jsonl(path)))
    return {v: sorted(c, key=lambda x: x.seed) for v, c in cells.items()}


ROWS: list[dict] = []
DATA: dict[str, tuple] = {}
"""Row id -> what its adjusted interval is recomputed from: (a, b, scale, p) or ("fisher", p)."""
ALPHA = 0.05


def _r(x: float, scale: float) -> float | None:
    """Points to 2 decimals; raw numbers to 4 significant digits (a relative L2 of 6e-4 keeps its size)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(scale * x, 2) if scale != 1 else float(f"{x:.4g}")


def _p(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


def claim(cid: str, text: str, study: str, direction: str, a: list[float], b: list[float] | None = None, *,
          arms: str, base: str, scale: float = 100.0, note: str = "") -> dict:
    """Record one claim: a vs b over seeds (or a's mean change when b is None) in `direction`."""
    d = one_sample(a) if b is None else difference(a, b)
    row = {"id": cid, "claim": text, "study": study, "arms": arms, "direction": direction, "base": base,
           "test": "one-sample t" if b is None else "Welch t",
           "seeds": [d.n_a] + ([d.n_b] if b is not None else []), "diff": _r(d.diff, scale),
           "low": _r(d.low, scale), "high": _r(d.high, scale), "p_t": _p(d.p_welch), "p_perm": _p(d.p_perm),
           "verdict_95": verdict((d.low, d.high), direction), "unit": "points" if scale == 100 else "raw",
           "note": note}
    ROWS.append(row)
    DATA[cid] = (a, b, scale, d.p_welch)
    return row


def binary(cid: str, text: str, study: str, direction: str, yes_a: int, n_a: int, yes_b: int, n_b: int, *,
           arms: str, base: str, note: str = "") -> dict:
    """Record one yes/no claim over seeds: yes_a of n_a runs of arm a against yes_b of n_b of arm b
    (Fisher's exact test); diff is the difference of the two shares in points."""
    p = fisher_exact(yes_a, n_a, yes_b, n_b)
    diff = yes_a / n_a - yes_b / n_b
    row = {"id": cid, "claim": text, "study": study, "arms": arms, "direction": direction, "base": base,
           "test": "Fisher exact", "seeds": [n_a, n_b], "counts": [yes_a, n_a, yes_b, n_b],
           "diff": _r(diff, 100.0), "low": None, "high": None, "p_t": None, "p_perm": None, "p_fisher": _p(p),
           "verdict_95": _p_verdict(p, diff, direction, ALPHA), "unit": "points", "note": note}
    ROWS.append(row)
    DATA[cid] = ("fisher", p)
    return row


def _p_verdict(p: float, diff: float, direction: str, alpha: float) -> str:
    """The rule for a row without an interval: the sign of diff where p < alpha, else inconclusive."""
    if p >= alpha or diff == 0:
        return "inconclusive"
    return "agrees" if (diff > 0) == (direction == "+") else "disagrees"


def family_of(row: dict) -> str:
    """The family a row is adjusted in: one per model. Section 1's rows (`S.*`: SmolLM2-135M) are one
    study of one base; every other row is the 76M model at GPU scale."""
    return "smollm2" if row["id"].startswith("S.") else "gpu_76m"


def adjust(rows: list[dict]) -> None:
    """Holm over each family of `rows` (see the module docstring and `family_of`): p_holm, the adjusted
    interval and its level, and the verdict read from it, written into each row."""
    for name in dict.fromkeys(family_of(r) for r in rows):
        members = [r for r in rows if family_of(r) == name]
        _adjust_family(members, name)


def _adjust_family(rows: list[dict], name: str) -> None:
    family = holm([DATA[r["id"]][-1] for r in rows], ALPHA)
    for r, h in zip(rows, family):
        r["family"], r["family_size"] = name, len(rows)
        r["p_holm"] = _p(h.p_adjusted)
        r["level_adj"] = round(1 - h.alpha, 6)
        kind = DATA[r["id"]]
        if kind[0] == "fisher":
            r["low_adj"] = r["high_adj"] = None
            r["verdict"] = _p_verdict(kind[1], r["diff"], r["direction"], h.alpha)
            continue
        a, b, scale, _ = kind
        d = one_sample(a, level=1 - h.alpha) if b is None else difference(a, b, level=1 - h.alpha)
        r["low_adj"], r["high_adj"] = _r(d.low, scale), _r(d.high, scale)
        r["verdict"] = verdict((d.low, d.high), r["direction"])


def mean_of(values) -> float:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return st.mean(xs) if xs else math.nan


# -- the studies -------------------------------------------------------------------------------------------
def teacher_stability(root: Path) -> None:
    study = "teacher_stability_gpu"
    cells = load(root, study)
    base = next(iter(cells.values()))[0].base_fingerprint()
    ev = {v: [c.evals() for c in cs] for v, cs in cells.items()}
    gcd = {v: [e[(200, "gcd")] for e in es] for v, es in ev.items()}
    for stable in ("ema_slow", "frozen", "trust_region"):
        for fast in ("current", "ema_fast", "ema"):
            claim(f"F1.final.{stable}-{fast}", "a stable teacher ends higher on the trained domain than a fast one",
                  study, "+", gcd[stable], gcd[fast], arms=f"{stable} - {fast}, gcd at step 200", base=base)
        claim(f"F1.step50.{stable}", "stable teachers specialise fast (+6 by step 50)", study, "+",
              [e[(50, "gcd")] - e[(0, "gcd")] for e in ev[stable]], arms=f"{stable}: gcd step 50 - base", base=base)
        claim(f"F1.untrained.{stable}", "stable teachers keep the untrained domains (a loss would disagree)", study,
              "-", [mean_of(e[(200, d)] for d in UNTRAINED) - mean_of(e[(0, d)] for d in UNTRAINED)
                    for e in ev[stable]],
              arms=f"{stable}: untrained mean, step 200 - base", base=base,
              note="'agrees' here means a loss is shown; the text claimed none")
    claim("F1.order.step50", "the current teacher collapses sooner than EMA 0.2", study, "+",
          [e[(50, "gcd")] for e in ev["ema_fast"]], [e[(50, "gcd")] for e in ev["current"]],
          arms="ema_fast - current, gcd at step 50", base=base)
    claim("F1.order.step100", "EMA 0.2 collapses sooner than EMA 0.05", study, "+",
          [e[(100, "gcd")] for e in ev["ema"]], [e[(100, "gcd")] for e in ev["ema_fast"]],
          arms="ema - ema_fast, gcd at step 100", base=base)
    claim("F1.final.ema-ema_slow", "the reference EMA 0.05 degrades against EMA 0.01", study, "-",
          gcd["ema"], gcd["ema_slow"], arms="ema - ema_slow, gcd at step 200", base=base)
    kl = {v: [c.drift(1).get("response/kl_to_base") for c in cs] for v, cs in cells.items()}
    claim("F1.kl.ema-frozen", "a faster teacher moves the responses further from the base", study, "+",
          kl["ema"], kl["frozen"], arms="ema - frozen, response KL to base", base=base, scale=1.0)


def teacher_stability_stable(root: Path) -> None:
    """Section 1b: StableSDPO beside the frozen and the reference EMA teacher (its own study directory)."""
    study = "teacher_stability_stable_gpu"
    cells = load(root, study)
    base = next(iter(cells.values()))[0].base_fingerprint()
    ev = {v: [c.evals() for c in cs] for v, cs in cells.items()}
    gcd = {v: [e[(200, "gcd")] for e in es] for v, es in ev.items()}
    claim("F1b.stable-ema", "StableSDPO ends above the reference EMA 0.05 teacher (paper, Table 1)", study, "+",
          gcd["stable"], gcd["ema"], arms="stable - ema, gcd at step 200", base=base)
    claim("F1b.frozen-ema", "the frozen teacher ends above the reference EMA 0.05 teacher (paper, Table 1)", study,
          "+", gcd["frozen"], gcd["ema"], arms="frozen - ema, gcd at step 200", base=base)
    claim("F1b.stable-frozen", "StableSDPO ends a little below the frozen teacher (paper: 55.00 vs 56.42)", study,
          "-", gcd["stable"], gcd["frozen"], arms="stable - frozen, gcd at step 200", base=base,
          note="equality cannot be shown; 'inconclusive' = no difference detected")
    claim("F1b.stable.gain", "StableSDPO improves the trained domain", study, "+",
          [e[(200, "gcd")] - e[(0, "gcd")] for e in ev["stable"]], arms="stable: gcd step 200 - base", base=base)


def cot(root: Path) -> None:
    study = "cot_gpu"
    cells = load(root, study)
    base = next(iter(cells.values()))[0].base_fingerprint()
    ev = {v: [c.evals() for c in cs] for v, cs in cells.items()}

    def at(v: str, step: int, domain: str = "gcd") -> list[float]:
        return [e[(step, domain)] for e in ev[v]]

    claim("F2.step50", "answer-only demonstrations specialise faster than the full worked solution", study, "+",
          at("answer_only", 50), at("full", 50), arms="answer_only - full, gcd at step 50", base=base)
    claim("F2.step200", "answer-only ahead of the full solution at the end", study, "+",
          at("answer_only", 200), at("full", 200), arms="answer_only - full, gcd at step 200", base=base)
    claim("F2.ood", "answer-only transfers more to gcd_ood", study, "+",
          [e[(200, "gcd_ood")] - e[(0, "gcd_ood")] for e in ev["answer_only"]],
          [e[(200, "gcd_ood")] - e[(0, "gcd_ood")] for e in ev["full"]], arms="answer_only - full, gcd_ood change",
          base=base)
    claim("F2.untrained", "the full solution forgets the untrained domains less", study, "-",
          [mean_of(e[(200, d)] - e[(0, d)] for d in UNTRAINED) for e in ev["full"]],
          [mean_of(e[(200, d)] - e[(0, d)] for d in UNTRAINED) for e in ev["answer_only"]],
          arms="full - answer_only, untrained change", base=base, note="'agrees' = full loses less")
    claim("F2.feedback", "feedback only degrades the trained domain", study, "-",
          [e[(200, "gcd")] - e[(0, "gcd")] for e in ev["feedback_only"]], arms="feedback_only: gcd step 200 - base",
          base=base)
    ent = {v: [mean_of(r.get("sdpo/teacher_entropy") for r in c.rows if r["event"] == "train") for c in cs]
           for v, cs in cells.items()}
    claim("F2.teacher_entropy", "a teacher reading the worked solution is more deterministic", study, "-",
          ent["full"], ent["answer_only"], arms="full - answer_only, teacher entropy (mean over steps)", base=base,
          scale=1.0)


def ood(root: Path) -> None:
    study = "ood_gpu"
    cells = load(root, study)
    frozen = load(root, "ood_gpu_sdpo_frozen")["sdpo_frozen"]
    base, base_f = cells["grpo"][0].base_fingerprint(), frozen[0].base_fingerprint()

    def change(cs: list[Cell], domain: str) -> list[float]:
        return [c.evals()[(200, domain)] - c.evals()[(0, domain)] for c in cs]

    for v in ("grpo", "sdpo", "sft"):
        claim(f"F3.gcd.{v}", "one stage on gcd raises gcd (source-like task)", study, "+", change(cells[v], "gcd"),
              arms=f"{v}: gcd change", base=base)
        claim(f"F3.ood.{v}", "... and the partially related gcd_ood (SDPO: the paper says it hurts)", study,
              "-" if v == "sdpo" else "+", change(cells[v], "gcd_ood"), arms=f"{v}: gcd_ood change", base=base)
    claim("F3.gcd.sdpo_frozen", "SDPO with a frozen teacher raises gcd", "ood_gpu_sdpo_frozen", "+",
          change(frozen, "gcd"), arms="sdpo_frozen: gcd change", base=base_f)
    claim("F3.ood.sdpo_frozen", "SDPO with a frozen teacher hurts gcd_ood (the paper's claim)", "ood_gpu_sdpo_frozen",
          "-", change(frozen, "gcd_ood"), arms="sdpo_frozen: gcd_ood change", base=base_f)
    claim("F3.ood.sdpo-grpo", "SDPO (EMA 0.05) loses more on gcd_ood than GRPO", study, "-",
          change(cells["sdpo"], "gcd_ood"), change(cells["grpo"], "gcd_ood"), arms="sdpo - grpo, gcd_ood change",
          base=base)
    claim("F3.ood.sdpo_frozen-grpo", "frozen-teacher SDPO transfers less to gcd_ood than GRPO", study, "-",
          change(frozen, "gcd_ood"), change(cells["grpo"], "gcd_ood"), arms="sdpo_frozen - grpo, gcd_ood change",
          base=f"{base_f} vs {base}", note="crosses two bases (gcd_ood 36.7% vs 45.3% at the base)")
    others = [d for d in cells["grpo"][0].matrix()[1] if d not in ("gcd", "gcd_ood")]

    def others_change(cs):
        return [mean_of(c.evals()[(200, d)] - c.evals()[(0, d)] for d in others) for c in cs]

    claim("F3.others.sdpo-grpo", "SDPO (EMA 0.05) hurts the other domains more than GRPO", study, "-",
          others_change(cells["sdpo"]), others_change(cells["grpo"]), arms="sdpo - grpo, mean change of the 10 others",
          base=base)
    # the continual study's reversal stage (stage 4): reversal_ood change across that stage
    cont = load(root, "continual_gpu")
    cbase = cont["grpo"][0].base_fingerprint()

    def stage_change(cs, stage, domain):
        out = []
        for c in cs:
            R, domains, _ = c.matrix()
            out.append(R[stage, domains.index(domain)] - R[stage - 1, domains.index(domain)])
        return out

    claim("F3.reversal_ood.sdpo-grpo", "SDPO's reversal stage costs reversal_ood more than GRPO's", "continual_gpu",
          "-", stage_change(cont["sdpo"], 4, "reversal_ood"), stage_change(cont["grpo"], 4, "reversal_ood"),
          arms="sdpo - grpo, reversal_ood change over stage 4", base=cbase)
    drift = load(root, "drift_gpu")
    claim("F3.reversal_ood.sdpo-grpo.drift", "... repeated on the drift_gpu base", "drift_gpu", "-",
          stage_change(drift["sdpo"], 4, "reversal_ood"), stage_change(drift["grpo"], 4, "reversal_ood"),
          arms="sdpo - grpo, reversal_ood change over stage 4", base=drift["grpo"][0].base_fingerprint())


def continual_numbers(c: Cell) -> dict[str, float]:
    R, domains, sd = c.matrix()
    end = c.drift(R.shape[0] - 1)
    return {"avg": average_accuracy(R)[-1], "avg_trained": average_accuracy_trained(R, sd)[-1],
            "forgetting": mean_forgetting(R, sd), "forgetting_incl_base": mean_forgetting(R, sd, include_base=True),
            "bwt": backward_transfer(R, sd), "fwt": forward_transfer(R, sd), "avg_base": average_accuracy(R)[0],
            "stages": R.shape[0] - 1, **{k: end.get(k, math.nan) for k in (
                "param/rel_l2_base", "response/kl_to_base", "response/answer_changed_frac",
                "artifacts/repetition_rate", "artifacts/malformed_rate")}}


def continual(root: Path) -> None:
    for study in ("continual_gpu", "drift_gpu"):
        cells = load(root, study)
        base = cells["grpo"][0].base_fingerprint()
        num = {v: [continual_numbers(c) for c in cs] for v, cs in cells.items()}

        def col(v, k):
            return [n[k] for n in num[v]]

        tag = "" if study == "continual_gpu" else ".drift"
        claim(f"F4.avg{tag}", "SDPO ends below GRPO in average accuracy (all 12 domains)", study, "-",
              col("sdpo", "avg"), col("grpo", "avg"), arms="sdpo - grpo, final average, all domains", base=base)
        claim(f"F4.avg_trained{tag}", "... and over the 5 trained domains", study, "-",
              col("sdpo", "avg_trained"), col("grpo", "avg_trained"), arms="sdpo - grpo, final average, trained",
              base=base)
        claim(f"F4.forgetting{tag}", "SDPO forgets more than GRPO (Chaudhry)", study, "+",
              col("sdpo", "forgetting"), col("grpo", "forgetting"), arms="sdpo - grpo, mean forgetting", base=base)
        claim(f"F4.forgetting_incl_base{tag}", "... with the base row included (the earlier definition)", study, "+",
              col("sdpo", "forgetting_incl_base"), col("grpo", "forgetting_incl_base"),
              arms="sdpo - grpo, mean forgetting incl. base", base=base)
        claim(f"F4.bwt{tag}", "SDPO's backward transfer is more negative", study, "-", col("sdpo", "bwt"),
              col("grpo", "bwt"), arms="sdpo - grpo, BWT", base=base)
        claim(f"F4.fwt{tag}", "SDPO's forward transfer is more negative", study, "-", col("sdpo", "fwt"),
              col("grpo", "fwt"), arms="sdpo - grpo, FWT", base=base)
        claim(f"F4.sdpo_fall{tag}", "SDPO's average falls over the sequence", study, "-",
              [n["avg"] - n["avg_base"] for n in num["sdpo"]], arms="sdpo: final - base average", base=base)
        kl_dir = [("F5.kl", "response/kl_to_base", "+", "SDPO (EMA) drifts further in responses than GRPO"),
                  ("F5.l2", "param/rel_l2_base", "+", "SDPO drifts further in weights than GRPO (the paper's claim)"),
                  ("F5.changed", "response/answer_changed_frac", "+", "SDPO changes more probe answers than GRPO"),
                  ("F5.repetition", "artifacts/repetition_rate", "+", "SDPO repeats more than GRPO")]
        for cid, key, direction, text in kl_dir:
            claim(f"{cid}{tag}", text, study, direction, col("sdpo", key), col("grpo", key),
                  arms=f"sdpo - grpo, {key}", base=base, scale=1.0)
        if study == "continual_gpu":
            claim("F4.sft", "SFT gains over the sequence", study, "+", [n["avg"] - n["avg_base"] for n in num["sft"]],
                  arms="sft: final - base average", base=base)
        else:
            for key, text in (("response/kl_to_base", "frozen-teacher SDPO drifts no further in responses than GRPO"),
                              ("param/rel_l2_base", "frozen-teacher SDPO's weights move least")):
                claim(f"F5.frozen.{key}", text, study, "-", col("sdpo_frozen", key), col("grpo", key),
                      arms=f"sdpo_frozen - grpo, {key}", base=base, scale=1.0,
                      note="equality cannot be shown; 'inconclusive' = no difference detected")
            claim("F5.frozen_vs_ema.kl", "the moving (EMA) teacher, not the dense signal, adds the response drift",
                  study, "+", col("sdpo", "response/kl_to_base"), col("sdpo_frozen", "response/kl_to_base"),
                  arms="sdpo - sdpo_frozen, response KL", base=base, scale=1.0)


SMOLLM2_OOD = {"products_1x1": "products_1x2", "chain_sum_2x1": "chain_sum_3x1", "lcm_10": "lcm_20",
               "basic_2x1": "basic_3x1"}
"""The partially related variant of each stage domain of continual_smollm2 (same task, other size)."""


def smollm2_numbers(c: Cell) -> dict[str, float]:
    """continual_numbers plus, per stage k, the in-domain gain (stage k's domain after stage k minus
    before it) and the change of that domain's partially related variant over the same stage."""
    R, domains, sd = c.matrix()
    gains = [R[k + 1, j] - R[k, j] for k, j in enumerate(sd)]
    related = [R[k + 1, domains.index(SMOLLM2_OOD[domains[j]])] - R[k, domains.index(SMOLLM2_OOD[domains[j]])]
               for k, j in enumerate(sd)]
    end = c.drift(R.shape[0] - 1)
    return {**continual_numbers(c), "gain": float(np.mean(gains)), "gain_stage1": float(gains[0]),
            "gain_later": float(np.mean(gains[1:])), "related": float(np.mean(related)),
            **{k: end.get(k, math.nan) for k in ("param/max_angle", "artifacts/multiple_answer_rate",
                                                 "artifacts/text_after_answer_rate", "general/first_line_agreement",
                                                 "general/text_ppl")}}


LOOP = 0.5
"""A run is in the repeated \\boxed loop when more than this share of its probe answers hold several boxes."""
FACTS: dict[str, dict] = {}
"""Numbers the prose of RESULTS.md quotes beside the verdict rows, computed here from the same records."""


def smollm2_facts(cells: dict[str, list[Cell]], num: dict[str, list[dict]]) -> dict:
    """Per-stage StableSDPO - GRPO in-domain gain and accuracy on the stage's own domain at its end
    ([diff, low, high], Welch, points), the related variant's gain while its source
    trains (GRPO and SFT cells), and the loop seeds' multiple-box share after each stage."""
    def stage_gains(c: Cell) -> list[float]:
        R, _, sd = c.matrix()
        return [R[k + 1, j] - R[k, j] for k, j in enumerate(sd)]

    def interval(a, b) -> list[float]:
        d = difference(a, b)
        return [_r(d.diff, 100.0), _r(d.low, 100.0), _r(d.high, 100.0)]

    gains = {v: [stage_gains(c) for c in cells[v]] for v in ("grpo", "sdpo_stable")}
    per_stage = {f"stage{k + 1}": interval([g[k] for g in gains["sdpo_stable"]], [g[k] for g in gains["grpo"]])
                 for k in range(len(gains["grpo"][0]))}
    own = {}
    for k in range(len(gains["grpo"][0])):
        at_end = {v: [c.matrix()[0][k + 1, c.matrix()[2][k]] for c in cells[v]] for v in ("grpo", "sdpo_stable")}
        own[f"stage{k + 1}"] = interval(at_end["sdpo_stable"], at_end["grpo"])
    related = {}
    for v in ("grpo", "sft"):
        for c in cells[v]:
            R, domains, sd = c.matrix()
            for k, j in enumerate(sd):
                if domains[j] == "products_1x1":
                    col = domains.index(SMOLLM2_OOD["products_1x1"])
                    related.setdefault(v, []).append(_r(R[k + 1, col] - R[k, col], 100.0))
    loop = {}
    for v in ("sdpo",):
        for c in cells[v]:
            R = c.matrix()[0]
            rates = [c.drift(k).get("artifacts/multiple_answer_rate", math.nan) for k in range(1, R.shape[0])]
            if rates[-1] > LOOP:
                loop[f"{v}-s{c.seed}"] = [_r(x, 100.0) for x in rates]
    return {"stable_minus_grpo_gain_per_stage": per_stage, "stable_minus_grpo_own_domain_after_stage": own,
            "products_1x2_change_while_products_1x1_trains": related,
            "loop_cells_multiple_box_percent_after_each_stage": loop,
            "base_fingerprint": cells["grpo"][0].base_fingerprint()}


DISTANCE_BINS = 6
"""Equal-count distance bins of the forgetting-vs-distance analysis."""


def distance_facts(study_dir: Path, cells: dict[str, list[Cell]]) -> dict:
    """Forgetting against MMD^2 to the trained domain (the cells' distance.json), binned two ways: over
    all points (the earlier reading, points treated as independent, which they are not) and over the
    domain-pair means (`pair_means`: the independent units); the drop in points, t intervals."""
    from cptlab.analysis.distance import binned, forgetting_vs_distance, pair_means

    points = []
    for v, cs in cells.items():
        for c in cs:
            path = study_dir / f"{v}-s{c.seed}" / "distance.json"
            if path.is_file():
                R, domains, sd = c.matrix()
                points += forgetting_vs_distance(R, domains, sd, json.loads(path.read_text()))
    if not points:
        return {}

    def rounded(bins: list[dict]) -> list[dict]:
        return [{**b, **{k: round(b[k], 3) for k in ("low_distance", "high_distance", "distance")},
                 **{k: _r(b[k], 100.0) for k in ("mean", "low", "high")}} for b in bins]

    by_point = binned([{**p, "points": 1} for p in points], DISTANCE_BINS)
    for b, chunk in zip(by_point, _chunks(sorted(points, key=lambda p: p["distance"]), DISTANCE_BINS)):
        b["pairs"] = len({(p["trained"], p["domain"]) for p in chunk})
    units = pair_means(points)
    return {"points": len(points), "pairs": len(units), "bins_over_points": rounded(by_point),
            "bins_over_pairs": rounded(binned(units, DISTANCE_BINS))}


def _chunks(xs: list, bins: int) -> list[list]:
    size, extra = divmod(len(xs), bins)
    out, start = [], 0
    for b in range(bins):
        out.append(xs[start:start + size + (b < extra)])
        start += len(out[-1])
    return out


def smollm2(root: Path) -> None:
    """The headline study: SmolLM2-135M-Instruct after a format warm-up, four arithmetic stages."""
    study = "continual_smollm2"
    cells = load(root, study)
    if not cells:
        return
    base = cells["grpo"][0].base_fingerprint()
    num = {v: [smollm2_numbers(c) for c in cs] for v, cs in cells.items()}

    def col(v, k):
        return [n[k] for n in num[v]]

    def vs(cid, text, direction, key, a="sdpo", b="grpo", scale=100.0, what=None):
        claim(f"S.{cid}", text, study, direction, col(a, key), col(b, key), arms=f"{a} - {b}, {what or key}",
              base=base, scale=scale)

    vs("F1.gain.stable-ema", "SDPO specialises fast only with a stable teacher (in-domain gain per stage)", "+",
       "gain", "sdpo_stable", "sdpo", what="mean in-domain gain per stage")
    vs("F1.gain.stable-ema.later", "... stages 2-4 (the stable teacher is the base itself in stage 1)", "+",
       "gain_later", "sdpo_stable", "sdpo", what="mean in-domain gain, stages 2-4")
    vs("F1.gain.ema-grpo", "SDPO with the reference EMA teacher learns its stages slower than GRPO", "-", "gain",
       what="mean in-domain gain per stage")
    vs("F1.gain.stable-grpo", "... and StableSDPO too (a difference either way is shown, not equality)", "-", "gain",
       "sdpo_stable", "grpo", what="mean in-domain gain per stage")
    claim("S.F3.related.sdpo", "SDPO hurts the partially related domains (change over the stage that trains "
          "the source)", study, "-", col("sdpo", "related"), arms="sdpo: related-variant change per stage", base=base)
    vs("F3.related.sdpo-grpo", "SDPO gains less on the partially related domains than GRPO", "-", "related",
       what="related-variant change per stage")
    vs("F4.avg", "SDPO ends below GRPO in average accuracy (all 12 domains)", "-", "avg", what="final average")
    vs("F4.avg_trained", "... and over the 4 trained domains", "-", "avg_trained", what="final average, trained")
    vs("F4.forgetting", "SDPO forgets more than GRPO (Chaudhry)", "+", "forgetting", what="mean forgetting")
    vs("F4.bwt", "SDPO's backward transfer is more negative", "-", "bwt", what="BWT")
    vs("F4.fwt", "SDPO's forward transfer is more negative", "-", "fwt", what="FWT")
    vs("F4.forgetting.stable", "StableSDPO forgets more than GRPO", "+", "forgetting", "sdpo_stable",
       what="mean forgetting")
    vs("F5.rel_l2", "SDPO drifts further in weights (relative L2 to base)", "+", "param/rel_l2_base", scale=1.0,
       what="relative L2 to base, end")
    vs("F5.max_angle", "... and in the principal angles of its weight matrices (degrees)", "+", "param/max_angle",
       scale=1.0, what="largest principal angle, end")
    vs("F5.kl", "SDPO drifts further in responses (token KL to base)", "+", "response/kl_to_base", scale=1.0,
       what="token KL to base, end")
    vs("F5.general", "SDPO keeps fewer of the base's answers to general prompts", "-",
       "general/first_line_agreement", scale=1.0, what="general-probe first-line agreement, end")
    vs("F6.multiple", "the SDPO loop amplifies the answer format (several \\boxed answers per response)", "+",
       "artifacts/multiple_answer_rate", scale=1.0, what="answers with several boxes, end")
    vs("F6.after", "... and text after the answer", "+", "artifacts/text_after_answer_rate", scale=1.0,
       what="answers with text after the box, end")
    vs("F6.malformed", "... and malformed answers", "+", "artifacts/malformed_rate", scale=1.0,
       what="malformed answers, end")
    loop = {v: sum(n["artifacts/multiple_answer_rate"] > LOOP for n in num[v]) for v in ("sdpo", "grpo")}
    binary("S.F6.loop", "more SDPO runs than GRPO runs fall into the repeated \\boxed loop", study, "+",
           loop["sdpo"], len(num["sdpo"]), loop["grpo"], len(num["grpo"]),
           arms=f"sdpo vs grpo, seeds with > {LOOP:.0%} of probe answers holding several boxes at the end", base=base)
    FACTS["smollm2"] = smollm2_facts(cells, num)
    FACTS["smollm2_distance"] = distance_facts(root / study, cells)


def collapse(root: Path) -> None:
    study = "collapse_gpu"
    cells = load(root, study)
    base = cells["grpo"][0].base_fingerprint()

    def row(c: Cell, stage: int) -> float:
        R = c.matrix()[0]
        return float(average_accuracy(R)[stage]) if stage < R.shape[0] else math.nan

    def malformed(c: Cell, stage: int) -> float:
        return c.drift(stage).get("artifacts/malformed_rate", math.nan)

    claim("F6.stage1_avg", "the current-weights teacher collapses in stage 1 (average accuracy vs GRPO)", study, "-",
          [row(c, 1) for c in cells["sdpo_current"]], [row(c, 1) for c in cells["grpo"]],
          arms="sdpo_current - grpo, average after stage 1", base=base)
    base_avg = {v: [float(average_accuracy(c.matrix()[0])[0]) for c in cells[v]] for v in ("sdpo_current", "grpo")}
    fell = {v: sum(row(c, 1) < 0.5 * b for c, b in zip(cells[v], base_avg[v])) for v in base_avg}
    binary("F6.stage1_collapsed", "more current-teacher SDPO runs than GRPO runs collapse in stage 1", study, "+",
           fell["sdpo_current"], len(cells["sdpo_current"]), fell["grpo"], len(cells["grpo"]),
           arms="sdpo_current vs grpo, seeds whose average after stage 1 is below half the base's", base=base)
    claim("F6.stage1_malformed", "... with malformed answers", study, "+",
          [malformed(c, 1) for c in cells["sdpo_current"]], [malformed(c, 1) for c in cells["grpo"]],
          arms="sdpo_current - grpo, malformed rate after stage 1", base=base,
          scale=1.0)
    claim("F6.slow_ema_malformed", "even the slow-EMA teacher amplifies malformed answers (vs GRPO, stage 5)", study,
          "+", [malformed(c, 5) for c in cells["sdpo_ema_slow"]], [malformed(c, 5) for c in cells["grpo"]],
          arms="sdpo_ema_slow - grpo, malformed rate after stage 5", base=base, scale=1.0)
    claim("F6.slow_ema_growth", "... and its malformed rate grows over the sequence (stage 5 - stage 1)", study, "+",
          [malformed(c, 5) - malformed(c, 1) for c in cells["sdpo_ema_slow"]],
          arms="sdpo_ema_slow: malformed stage 5 - stage 1", base=base, scale=1.0)
    num = {v: [continual_numbers(c) for c in cells[v]] for v in ("grpo", "sdpo_ema_slow")}
    for key, direction, text in (("forgetting", "-", "at lr 1e-4 slow-EMA SDPO forgets less than GRPO"),
                                 ("bwt", "+", "... and has the less negative BWT"),
                                 ("avg", "+", "... final average accuracy")):
        claim(f"F4.lr1e-4.{key}", text, study, direction, [n[key] for n in num["sdpo_ema_slow"]],
              [n[key] for n in num["grpo"]], arms=f"sdpo_ema_slow - grpo, {key}", base=base)


# -- the order of events in collapsing runs (finding 6's mechanism) -------------------------------------------
SMOOTH = 5
"""Each per-step series is a trailing mean over this many steps (one step's 256 rollouts are noisy)."""
SUSTAIN = 3
"""A signal's onset: the first step from which it stays past its threshold for SUSTAIN steps."""
DROPS = (0.10, 0.25, 0.50)
"""Matched relative falls below the first-10-step level, so that accuracy, format rate and the share of
reprompts with a demonstration are held to the same standard."""
FALLING = {"accuracy": "accuracy", "format": "format_rate", "demonstrations": "teacher/with_demo_frac"}
RISING = {"kl_to_base > 0.5": ("kl_to_base", lambda x, b: x > 0.5),
          "entropy x2": ("entropy", lambda x, b: x > 2 * b),
          "length ±25%": ("response_length", lambda x, b: abs(x - b) > 0.25 * b)}


def _smooth(xs: list[float]) -> list[float]:
    return [st.mean(xs[max(0, i - SMOOTH + 1): i + 1]) for i in range(len(xs))]


def _onset(train: list[dict], key: str, crossed) -> int | None:
    raw = [r.get(key) for r in train]
    if any(x is None for x in raw):
        return None
    xs, level = _smooth(raw), st.mean(raw[:10])
    hit = [crossed(x, level) for x in xs]
    return next((train[i]["step"] for i in range(len(hit) - SUSTAIN + 1) if all(hit[i:i + SUSTAIN])), None)


def onsets(train: list[dict]) -> dict[str, int | None]:
    """Signal -> the step (within the stage) at which it first crossed its threshold, None if never."""
    out = {}
    for drop in DROPS:
        for name, key in FALLING.items():
            out[f"{name} -{int(100 * drop)}%"] = _onset(train, key, lambda x, b, d=drop: x < (1 - d) * b)
    for name, (key, crossed) in RISING.items():
        out[name] = _onset(train, key, crossed)
    return out


COLLAPSING = (("collapse_gpu", ("sdpo_current",)), ("teacher_stability_gpu", ("current", "ema_fast", "ema")))
"""The cells whose trained-domain rollout accuracy fell (SDPO with a fast teacher)."""


def mechanism(root: Path) -> list[dict]:
    """Onsets per collapsing cell (stage 1), for every cell whose rollout accuracy fell by 10% or more."""
    out = []
    for study, variants in COLLAPSING:
        cells = load(root, study)
        for v in variants:
            for c in cells[v]:
                train = [r for r in c.rows if r["event"] == "train" and r["stage"] == 1]
                o = onsets(train)
                if o["accuracy -10%"] is not None:
                    out.append({"study": study, "variant": v, "seed": c.seed, "steps": len(train), **o})
    return out


def plot_mechanism(root: Path, order: list[dict], out: Path) -> None:
    """One panel per collapsing cell: accuracy, format rate and demonstration share relative to their
    first-10-step level, KL to base on its own axis, and the 25% onsets as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 4
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.5 * nrows), dpi=80, squeeze=False)
    colours = {"accuracy": "#1f77b4", "format": "#d62728", "demonstrations": "#2ca02c"}
    for ax, o in zip(axes.flat, order):
        c = next(c for c in load(root, o["study"])[o["variant"]] if c.seed == o["seed"])
        train = [r for r in c.rows if r["event"] == "train" and r["stage"] == 1]
        steps = [r["step"] for r in train]
        for name, key in FALLING.items():
            raw = [r[key] for r in train]
            ax.plot(steps, [x / st.mean(raw[:10]) for x in _smooth(raw)], color=colours[name], lw=1.3, label=name)
            if o[f"{name} -25%"] is not None:
                ax.axvline(o[f"{name} -25%"], color=colours[name], ls=":", lw=1)
        twin = ax.twinx()
        twin.plot(steps, _smooth([r["kl_to_base"] for r in train]), color="#7f7f7f", lw=1, ls="--", label="KL to base")
        twin.tick_params(labelsize=6)
        ax.set_title(f"{o['study'].replace('_gpu', '')} {o['variant']} s{o['seed']}", fontsize=8)
        ax.set_ylim(-0.05, 1.35)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=v, lw=1.3) for v in colours.values()]
    handles.append(plt.Line2D([], [], color="#7f7f7f", ls="--"))
    fig.legend(handles, [f"{k} (÷ first-10-step level)" for k in colours] + ["token KL to base (right axis)"],
               loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"stage 1 of the collapsing SDPO cells: {SMOOTH}-step trailing means; dotted: first step of a "
                 f"sustained 25% fall", fontsize=8, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out)


def build(root: Path) -> tuple[dict, list[dict]]:
    """Every row, Holm-adjusted over the whole family, and the collapse onsets: (verdicts.json's content,
    the onsets). Starts from nothing on every call."""
    ROWS.clear()
    DATA.clear()
    FACTS.clear()
    for fn in (smollm2, teacher_stability, teacher_stability_stable, cot, ood, continual, collapse):
        fn(root)
    order = mechanism(root)
    leads = [o["format -25%"] - o["accuracy -25%"] for o in order
             if o["format -25%"] is not None and o["accuracy -25%"] is not None]
    claim("F6.order", "the answer format breaks before the accuracy falls (format onset - accuracy onset < 0)",
          "collapse_gpu + teacher_stability_gpu", "-", leads, arms="format -25% step - accuracy -25% step, per cell",
          base="1c0ea617, 8eb1baff", scale=1.0,
          note="cells as units; cells of one study share a base, so they are not fully independent")
    adjust(ROWS)
    sizes = {f: sum(family_of(r) == f for r in ROWS) for f in dict.fromkeys(family_of(r) for r in ROWS)}
    content = {"families": {"rows": sizes, "alpha": ALPHA, "adjustment": "Holm step-down within each family"},
               "claims": ROWS, "facts": FACTS, "collapse_onsets": order, "smooth_steps": SMOOTH,
               "sustain_steps": SUSTAIN, "drops": list(DROPS)}
    return json.loads(json.dumps(content)), order


# -- RESULTS.md's verdict tables ----------------------------------------------------------------------------
SECTIONS = {"1": ("S.",), "gpu1": ("F1.",), "gpu1b": ("F1b.",), "gpu2": ("F2.",), "gpu3": ("F3.",),
            "gpu4": ("F4.",), "gpu5": ("F5.",), "gpu5b": ("F5.frozen",), "gpu6": ("F6.",)}
"""RESULTS.md block name -> the id prefixes of its rows (a block sits between `<!-- verdicts:NAME -->`
and `<!-- /verdicts:NAME -->`); a row goes to the block with its longest matching prefix."""


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "–"
    return f"{x:+.1f}" if unit == "points" else f"{x:+.3g}"


def _pfmt(p: float | None) -> str:
    return "–" if p is None else "<0.0001" if p < 0.0001 else f"{p:.4f}".rstrip("0").rstrip(".") if p < 1 else "1"


def table_markdown(rows: list[dict]) -> str:
    """The verdict table of `rows` as RESULTS.md shows it (generated; never edit it by hand)."""
    out = ["| claim | arms | n | difference [95% interval] | p_t | p_perm | Holm p | Holm-adjusted interval "
           "(level) | verdict (adjusted) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u = r["unit"]
        if r["test"] == "Fisher exact":
            ya, na, yb, nb = r["counts"]
            diff = f"{ya}/{na} vs {yb}/{nb} seeds ({_num(r['diff'], u)} points)"
            p_t, p_perm, adj = "–", f"Fisher {_pfmt(r['p_fisher'])}", f"– ({100 * r['level_adj']:.2f}%)"
        else:
            diff = f"{_num(r['diff'], u)} [{_num(r['low'], u)}, {_num(r['high'], u)}]"
            p_t, p_perm = _pfmt(r["p_t"]), _pfmt(r["p_perm"])
            adj = f"[{_num(r['low_adj'], u)}, {_num(r['high_adj'], u)}] ({100 * r['level_adj']:.2f}%)"
        v = r["verdict"]
        v = f"**{v}**" if v != "inconclusive" else v
        if r["verdict_95"] != r["verdict"]:
            v += f" ({r['verdict_95']} at 95% unadjusted)"
        n = "/".join(map(str, r["seeds"]))
        out.append(f"| {r['claim']} (`{r['id']}`) | {r['arms']} | {n} | {diff} | {p_t} | {p_perm} | "
                   f"{_pfmt(r['p_holm'])} | {adj} | {v} |")
    return "\n".join(out)


def section_rows(rows: list[dict], name: str) -> list[dict]:
    def block(row_id: str) -> str | None:
        found = [(len(p), n) for n, ps in SECTIONS.items() for p in ps if row_id.startswith(p)]
        return max(found)[1] if found else None

    return [r for r in rows if block(r["id"]) == name]


def results_with_tables(text: str, rows: list[dict]) -> str:
    """RESULTS.md's text with every verdict block replaced by the table the rows give (KeyError-free: a
    block the text lacks is left out, and `missing_blocks` names it)."""
    import re

    for name in SECTIONS:
        pattern = re.compile(rf"(<!-- verdicts:{name} -->\n)(?:.*?\n)?(<!-- /verdicts:{name} -->)", re.DOTALL)
        text = pattern.sub(lambda m: m.group(1) + table_markdown(section_rows(rows, name)) + "\n" + m.group(2), text)
    return text


def missing_blocks(text: str) -> list[str]:
    return [n for n in SECTIONS if f"<!-- verdicts:{n} -->" not in text or f"<!-- /verdicts:{n} -->" not in text]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path, help="directory holding the unpacked docs/data/*.tgz")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("verdicts.json"))
    p.add_argument("--results", type=Path, default=None, help="rewrite this RESULTS.md's verdict tables")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 where --out or docs/RESULTS.md differ from what the data give")
    a = p.parse_args()
    content, order = build(a.data)
    rows = content["claims"]
    if a.check:
        results = Path(__file__).with_name("RESULTS.md")
        text = results.read_text()
        stale = [str(f) for f, ok in ((a.out, a.out.is_file() and json.loads(a.out.read_text()) == content),
                                      (results, text == results_with_tables(text, rows) and not missing_blocks(text)))
                 if not ok]
        print("up to date" if not stale else "differs from the data: " + ", ".join(stale))
        raise SystemExit(1 if stale else 0)
    plot_mechanism(a.data, order, a.out.with_name("collapse_mechanism_gpu.png"))
    for r in rows:
        fmt = (lambda x: "–" if x is None else f"{x:+.2f}" if r["unit"] == "points" else f"{x:+.4f}")
        p_line = f"p_fisher={r['p_fisher']}" if r["test"] == "Fisher exact" else f"p_t={r['p_t']} p_perm={r['p_perm']}"
        print(f"{r['id']:34s} {r['arms']:52s} n={'/'.join(map(str, r['seeds'])):4s} {fmt(r['diff'])} "
              f"[{fmt(r['low'])}, {fmt(r['high'])}] {p_line} p_holm={r['p_holm']} "
              f"adj [{fmt(r['low_adj'])}, {fmt(r['high_adj'])}] -> {r['verdict']} (95%: {r['verdict_95']})")
    print("\nonset step of each signal in the collapsing cells (stage 1):")
    names = [k for k in order[0] if k not in ("study", "variant", "seed", "steps")] if order else []
    for o in order:
        print(f"{o['study']:22s} {o['variant']:13s} s{o['seed']} " + " ".join(f"{k}={o[k]}" for k in names))
    for drop in DROPS:
        tag = f"-{int(100 * drop)}%"
        both = [(o[f"accuracy {tag}"], o[f"format {tag}"]) for o in order if o[f"accuracy {tag}"] is not None]
        lead = [f - a_ for a_, f in both if f is not None]
        print(f"accuracy {tag} before format {tag}: {sum(x > 0 for x in lead)} of {len(both)} cells "
              f"(format never fell that far in {sum(f is None for _, f in both)}); lead in steps {sorted(lead)}")
    print("\nfacts:", json.dumps(content["facts"], indent=1))
    a.out.write_text(json.dumps(content, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.results is not None:
        text = a.results.read_text()
        if missing_blocks(text):
            raise SystemExit(f"--results {a.results}: no verdict block for {', '.join(missing_blocks(text))} "
                             "(expected <!-- verdicts:NAME --> ... <!-- /verdicts:NAME -->)")
        a.results.write_text(results_with_tables(text, rows))
        print(f"rewrote the verdict tables of {a.results}")


if __name__ == "__main__":
    main()
