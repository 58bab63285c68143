"""Plain names, units and one-line meanings of the numbers that report.html and compare.html draw.

No figure is titled by a raw metric key: `param/rel_l2_base` is drawn as "weights moved from the base",
in percent of the base weights' norm. Numbers of kind "share" (a fraction of answers, prompts or
entries) and "percent" (a ratio) are drawn in percent with the axis starting at zero; a share's axis
also reaches at least SHARE_AXIS_TOP, so that a rate going from 0.13% to 0.39% (a handful of answers) lies
along the floor instead of filling the axis. "value" numbers keep their own units and scale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    name: str
    unit: str  # the axis label
    meaning: str  # one line for a caption
    kind: str = "value"  # "share" | "percent" | "value"

    @property
    def in_percent(self) -> bool:
        return self.kind in ("share", "percent")

    @property
    def axis_top(self) -> float | None:
        """The least top of the y axis, which then starts at zero (percent: 0, fit the data from zero);
        None: the axis fits the data."""
        return SHARE_AXIS_TOP if self.kind == "share" else 0.0 if self.kind == "percent" else None


SHARE_AXIS_TOP = 5.0  # percent: a share's axis spans at least 0..5%


def _share(name: str, meaning: str, of: str = "evaluation answers") -> Label:
    return Label(name, f"% of {of}", meaning, "share")


METRICS: dict[str, Label] = {
    # parameter drift (drift records, analysis/drift.py)
    "param/rel_l2_base": Label("weights moved from the base", "% of the base weights' norm",
                               "relative L2 distance ‖W − W₀‖ / ‖W₀‖ of the weights from the base model's", "percent"),
    "param/rel_l2_prev": Label("weights moved over the stage", "% of the previous weights' norm",
                               "relative L2 distance of the weights from those after the previous stage", "percent"),
    "param/update_norm": Label("size of the update", "L2 norm ‖W − W₀‖", "absolute L2 norm of all weight changes"),
    "param/sparsity": _share("weights left (nearly) unchanged", "share of entries whose change is below 0.1% of "
                             "their tensor's largest change", "weight entries"),
    "param/effective_rank": Label("effective rank of the update", "dimensions",
                                  "exp(entropy of the normalised singular values) of each weight update, mean over matrices"),
    "param/subspace_overlap": _share("update aligned with the base's top directions", "mean cos² of the angles "
                                     "between the update's and the base weights' top-8 singular subspaces "
                                     "(random: about 8 / width)", "alignment"),
    "param/spectral_shift": Label("change of the singular values", "‖σ(W) − σ(W₀)‖ / ‖σ(W₀)‖",
                                  "relative change of each matrix's singular values, mean over matrices"),
    "param/max_angle": Label("rotation of the top subspace", "degrees",
                             "largest principal angle between the base's and the current top singular subspaces"),
    "param/principal_mask_overlap": _share("base's principal weights kept", "share of the base's principal weights "
                                           "still principal", "principal weights"),
    "param/principal_update_share": _share("updates on principal weights", "share of the most-moved weights that are "
                                           "principal weights of the base (random: 50%)", "most-moved weights"),
    # response drift (drift records, analysis/response.py; probe prompts of every evaluated domain)
    "response/kl_to_base": Label("answers drift from the base", "token KL(current ‖ base), nats per token",
                                 "how much less likely the base finds the model's own sampled answers"),
    "response/kl_to_base_k3": Label("answers drift from the base (k3)", "nats per token",
                                    "the same KL with Schulman's low-variance k3 estimator"),
    "response/entropy": Label("sampling entropy", "nats per token", "mean token entropy of the model's samples"),
    "response/sampled_mean_length": Label("sampled answer length", "tokens", "mean length of sampled answers"),
    "response/answer_changed_frac": _share("answers changed from the base's", "share of probe prompts whose greedy "
                                           "answer differs from the base model's", "probe prompts"),
    "response/mean_length": Label("greedy answer length", "tokens", "mean length of greedy answers"),
    "response/base_mean_length": Label("the base's greedy answer length", "tokens", "the base model's, for reference"),
    # artifacts of the evaluation answers (drift records, analysis/artifacts.py)
    "artifacts/malformed_rate": _share("malformed answers", "not exactly one closed answer wrapper with a real answer "
                                       "and nothing after it"),
    "artifacts/no_answer_rate": _share("no usable answer", "no closed wrapper, or the last one empty or a placeholder"),
    "artifacts/multiple_answer_rate": _share("several answers", "more than one answer wrapper"),
    "artifacts/unclosed_answer_rate": _share("answer left open", "an answer wrapper opened and never closed"),
    "artifacts/empty_answer_rate": _share("empty answer", "the last answer wrapper is empty"),
    "artifacts/placeholder_answer_rate": _share("placeholder answer", "the instruction's placeholder copied as the "
                                                "answer"),
    "artifacts/text_after_answer_rate": _share("text after the answer", "text follows the last answer wrapper"),
    "artifacts/distinct_1": _share("distinct tokens", "unique tokens / all tokens over all answers", "tokens"),
    "artifacts/distinct_2": _share("distinct token pairs", "unique 2-grams / all 2-grams over all answers", "2-grams"),
    "artifacts/distinct_3": _share("distinct token triples", "unique 3-grams / all 3-grams over all answers", "3-grams"),
    "artifacts/longest_repeated_ngram": Label("longest repeat within an answer", "tokens",
                                              "longest n-gram occurring twice in an answer, mean over answers"),
    "artifacts/repetition_rate": _share("repetition within answers", "share of an answer's 4-grams that repeat "
                                        "(rep-4), mean over answers", "4-grams"),
    "artifacts/mean_tokens": Label("answer length", "tokens", "mean length of the evaluation answers"),
    # general ability of a pretrained base (drift records, analysis/general.py)
    "general/first_line_agreement": _share("general prompts: same first line as the base",
                                           "48 fixed general prompts answered greedily", "general prompts"),
    "general/token_agreement": _share("general prompts: same next token as the base", "share of the base answers' "
                                      "tokens that are the model's top choice", "tokens"),
    "general/kl_to_base": Label("general prompts: KL to the base", "nats per token",
                                "token KL(base ‖ current) on the base model's own general answers"),
    "general/text_ppl": Label("perplexity of a fixed English text", "perplexity", "lower: the text reads as more "
                              "likely; a rise means general language is being forgotten"),
    # training records
    "reward": Label("training reward", "mean reward (1 = correct)", "mean reward of the step's sampled answers"),
    "kl_to_base": Label("KL from the base during training", "nats per token",
                        "token KL of the sampled answers to the base model"),
    "entropy": Label("sampling entropy during training", "nats per token", "mean token entropy of the rollouts"),
    "response_length": Label("training answer length", "tokens", "mean length of the rollouts"),
    "sdpo/divergence": Label("distillation loss", "divergence per token", "the SDPO divergence between student and "
                             "self-teacher"),
    "sdpo/top1_agreement": _share("teacher and student agree", "share of tokens where both rank the same token first",
                                  "tokens"),
    "teacher/with_demo_frac": _share("reprompts with a demonstration", "a successful sibling answer shown to the "
                                     "teacher", "samples"),
    "teacher/feedback_only_frac": _share("reprompts with feedback only", "only the verifier's feedback shown to the "
                                         "teacher", "samples"),
}

SUB_KINDS = {"attention": "attention", "mlp": "MLP", "embedding": "embedding", "norm": "norms", "other": "other"}
"""Per-module-type suffixes of the param/ keys (param/rel_l2_base/mlp)."""


def label(key: str) -> Label:
    """The key's label; an unknown key keeps its name, with its last part in words."""
    if key in METRICS:
        return METRICS[key]
    return Label(key.rsplit("/", 1)[-1].replace("_", " "), "", "")
