"""warmup.pretrained: a loaded model's format warm-up (SFT on non-stage domains), cached by its weights."""

import pytest
import torch

from cptlab.config import load_config
from cptlab.basemodel import base_model
from cptlab.errors import ConfigError
from cptlab.models import save_model, weights_sha256

WARM = ["warmup.pretrained=true", "warmup.domains=[reversal]", "warmup.steps=3", "warmup.batch_size=4",
        "warmup.examples_per_domain=16", "warmup.ood_fraction=0", "warmup.lr=1e-3"]


def test_format_warmup_trains_once_then_loads_from_its_cache(tmp_path, tiny_model, tokenizer):
    save_model(tiny_model, tokenizer, tmp_path / "m")
    cfg = load_config("smoke", [f"model.path={tmp_path / 'm'}", f"warmup.cache_dir={tmp_path / 'cache'}", *WARM])
    cpu = torch.device("cpu")
    first, _, info = base_model(cfg, cpu)
    assert info["warmup"]["loaded_weights_sha256"] == weights_sha256(tiny_model.state_dict())
    assert info["warmup"]["steps"] == 3 and "final_loss" in info["warmup"]
    assert weights_sha256(first.state_dict()) != weights_sha256(tiny_model.state_dict())  # the SFT moved the weights

    second, _, info2 = base_model(cfg, cpu)  # the cache, not a second warm-up
    assert "final_loss" not in info2["warmup"] and info2["warmup"]["cache"] == info["warmup"]["cache"]
    assert weights_sha256(second.state_dict()) == weights_sha256(first.state_dict())

    plain, _, info3 = base_model(load_config("smoke", [f"model.path={tmp_path / 'm'}"]), cpu)
    assert "warmup" not in info3 and weights_sha256(plain.state_dict()) == weights_sha256(tiny_model.state_dict())


def test_format_warmup_refuses_a_stage_domain(tmp_path):
    with pytest.raises(ConfigError, match="warmup.domains"):  # smoke trains on sorting in a stage
        load_config("smoke", [f"model.path={tmp_path}", "warmup.pretrained=true", "warmup.domains=[sorting]",
                              "stages=[{domain: sorting, steps: 1}]"])
