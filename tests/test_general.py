"""The general-ability probe: hand-computed agreement and perplexity, the base against itself, a
perturbed model against the base, and the config switch."""

import copy
import math

import pytest
import torch

from cptlab.analysis.general import (
    first_line_agreement, general_probe, load_probe, normalize_first_line, render_prompt, text_perplexity,
)
from cptlab.config import general_probe_enabled, load_config
from cptlab.errors import ConfigError
from cptlab.rollout import SamplingSpec

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: Name three primary colors.\nA:",
           "Q: Complete the sentence: Once upon a\nA:"]
SPEC = SamplingSpec(max_new_tokens=16, greedy=True, batch_size=2)


def test_packaged_probe_has_48_distinct_prompts_and_a_paragraph():
    prompts, text = load_probe()
    assert len(prompts) == len(set(prompts)) == 48 and len(text.split()) > 100


def test_first_line_normalisation_and_agreement_by_hand():
    assert normalize_first_line("\n  Paris.  \nThe capital ...") == "paris"
    assert normalize_first_line("The  Early\tbird!") == "the early bird"
    assert first_line_agreement(["Paris.", "red, blue", "x\ny"], ["paris", "Red, blue, green", " X \nz"]) == 2 / 3
    assert math.isnan(first_line_agreement([], []))


def test_probe_prompts_ignore_the_task_templates(tokenizer):
    assert render_prompt("Name a colour.", tokenizer, use_chat_template=True) == "Q: Name a colour.\nA:"
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "<user>{{ messages[0]['content'] }}</user>{% if add_generation_prompt %}<bot>{% endif %}"
    assert render_prompt("Name a colour.", chat, use_chat_template=True) == "<user>Name a colour.</user><bot>"
    assert render_prompt("Name a colour.", chat, use_chat_template=False) == "Q: Name a colour.\nA:"


def test_perplexity_equals_a_hand_computation(tiny_model, tokenizer):
    text = "The cat sat on the mat."
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]

    def nll(window):  # token by token: the log-probability of each token given its own prefix
        return sum(-torch.log_softmax(tiny_model(window[None, :t]).logits[0, -1], -1)[window[t]].item()
                   for t in range(1, len(window)))

    with torch.no_grad():
        whole = math.exp(nll(ids) / (len(ids) - 1))
        windows = [ids[s:s + 8] for s in range(0, len(ids), 8)]
        by_window = math.exp(sum(nll(w) for w in windows) / sum(len(w) - 1 for w in windows))
    assert text_perplexity(tiny_model, tokenizer, text) == pytest.approx(whole, rel=1e-5)
    assert text_perplexity(tiny_model, tokenizer, text, max_len=8) == pytest.approx(by_window, rel=1e-5)
    assert whole != pytest.approx(by_window, rel=1e-3)  # the windows really restart their context


def test_base_agrees_with_itself_and_a_perturbed_model_scores_lower(tiny_model, tokenizer):
    base = copy.deepcopy(tiny_model)
    _, text = load_probe()
    same, answers = general_probe(tiny_model, base, tokenizer, PROMPTS, text, SPEC)
    assert answers.completion_mask.sum() > 0
    assert same["first_line_agreement"] == 1.0 and same["token_agreement"] == 1.0
    assert same["kl_to_base"] == pytest.approx(0.0, abs=1e-6)

    perturbed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in perturbed.parameters():
            p.add_(0.5 * torch.randn_like(p))
    moved, again = general_probe(perturbed, base, tokenizer, PROMPTS, text, SPEC, base_answers=answers)
    assert again is answers  # the base's answers are reused, not regenerated
    assert moved["first_line_agreement"] < 1.0 and moved["token_agreement"] < 1.0 and moved["kl_to_base"] > 0.01
    assert moved["text_ppl"] != pytest.approx(same["text_ppl"])


def test_config_switch():
    assert not general_probe_enabled(load_config("smoke"))
    assert general_probe_enabled(load_config("smoke", ["model.path=/some/model"]))
    assert general_probe_enabled(load_config("smoke", ["eval.general_probe=on"]))
    assert not general_probe_enabled(load_config("smoke", ["model.path=/m", "eval.general_probe=off"]))
    assert not general_probe_enabled(load_config("smoke", ["model.path=/m", "eval.drift=false"]))
    with pytest.raises(ConfigError, match="eval.general_probe"):
        load_config("smoke", ["eval.general_probe=on", "eval.drift=false"])
