"""Domain distance (analysis/distance.py): the MMD estimators and the bandwidth rule by hand, embeddings
of a tiny model, the `cptlab distance` verb and the forgetting-vs-distance points."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from cptlab.analysis.distance import (
    forgetting_vs_distance, median_bandwidth, mmd2, mmd_matrix, prompt_embeddings, run_distance,
)
from cptlab.config import load_config, to_dict
from cptlab.prompts import student_prompt
from cptlab.tasks import make_split
from helpers import PNG_MAGIC, assert_one_line_error, images, make_run


def test_median_bandwidth_by_hand():
    # points 0, 1, 3, 7 on a line: pair distances 1, 3, 7, 2, 6, 4; torch's median of an even count is the
    # lower middle value: 3
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [3.0], [7.0]])) == 3.0
    assert median_bandwidth(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(18))


def test_mmd_by_hand():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])
    e = math.exp(-0.5)  # k at distance 1 with s = 1
    # biased: mean k(X,X) + mean k(Y,Y) - 2 mean k(X,Y) = (1+e)/2 * 2 - 2 (2e^-2 + e^-4.5 + e^-0.5) / 4
    cross = (2 * math.exp(-2) + math.exp(-4.5) + e) / 4
    assert mmd2(x, y, bandwidth=1.0) == pytest.approx(1 + e - 2 * cross)
    # unbiased: the within means drop i = j: e + e - 2 * cross
    assert mmd2(x, y, bandwidth=1.0, unbiased=True) == pytest.approx(2 * e - 2 * cross)


def test_mmd_of_identical_sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    assert mmd2(x, x.clone()) == 0.0  # biased: exactly 0
    # unbiased: a set against itself is one sample, its i = j pairs left out of every mean: exactly 0
    assert mmd2(x, x.clone(), unbiased=True) == 0.0
    assert mmd2(x, x + 3.0) > 0.5  # a shifted copy is far


def test_unbiased_mmd_of_a_set_with_itself_by_hand():
    # points 0, 1, 3 with s = 1: off-diagonal kernels a = k(0,1), b = k(0,3), c = k(1,3), each twice
    a, b, c = math.exp(-0.5), math.exp(-4.5), math.exp(-2.0)
    x = torch.tensor([[0.0], [1.0], [3.0]])
    # U-statistic: within means over the 6 pairs i != j: 2 (a + b + c) / 6 each; the cross mean over the
    # same 6 pairs (the 3 diagonal ones are a point against itself): 2 (a + b + c) / 6; 2/6 + 2/6 - 2 * 2/6 = 0.
    # Keeping the diagonal in the cross mean (the earlier bug) gave 4 (a+b+c)/6 - 2 (3 + 2 (a+b+c)) / 9 = -0.4993.
    assert mmd2(x, x.clone(), bandwidth=1.0, unbiased=True) == 0.0
    # a different set of the same size keeps its cross diagonal: y = x + 1 -> points 1, 2, 4
    y = x + 1.0
    # k(x_i, y_j) for x = 0,1,3 and y = 1,2,4: distances 1,2,4 / 0,1,3 / 2,1,1
    kxy = [[1, 2, 4], [0, 1, 3], [2, 1, 1]]
    cross = sum(math.exp(-d * d / 2) for row in kxy for d in row) / 9
    assert mmd2(x, y, bandwidth=1.0, unbiased=True) == pytest.approx(2 * 2 * (a + b + c) / 6 - 2 * cross)
    matrix, _ = mmd_matrix({"x": x, "y": y}, unbiased=True)
    assert matrix[0][0] == matrix[1][1] == 0.0


def test_mmd_matrix_shares_one_bandwidth_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    emb = {"a": torch.randn(30, 4, generator=g), "b": torch.randn(30, 4, generator=g) + 1.0,
           "c": torch.randn(30, 4, generator=g) + 4.0}
    matrix, s = mmd_matrix(emb)
    assert s == pytest.approx(median_bandwidth(torch.cat(list(emb.values()))))
    assert matrix[0][1] == matrix[1][0] == pytest.approx(mmd2(emb["a"], emb["b"], s))
    assert [matrix[i][i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert matrix[0][1] < matrix[0][2]  # b is nearer a than c is


def test_two_samples_of_one_domain_are_closer_than_two_domains(tiny_model, tokenizer):
    cfg = load_config(None, [])
    prompts = {d: [student_prompt(cfg.prompt, ex.question) for ex in make_split(d, "eval", 48)]
               for d in ("arithmetic", "sorting")}
    arith = prompt_embeddings(tiny_model, tokenizer, prompts["arithmetic"], batch_size=16)
    emb = {"arithmetic 1": arith[:24], "arithmetic 2": arith[24:],
           "sorting": prompt_embeddings(tiny_model, tokenizer, prompts["sorting"][:24], batch_size=16)}
    matrix, _ = mmd_matrix(emb)
    assert matrix[0][1] < matrix[0][2] and matrix[0][1] < matrix[1][2]
    # a prompt embeds alike alone and in a left-padded batch beside a longer prompt
    alone = prompt_embeddings(tiny_model, tokenizer, [prompts["arithmetic"][0]])
    padded = prompt_embeddings(tiny_model, tokenizer, [prompts["arithmetic"][0], prompts["sorting"][0] * 3])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_forgetting_points_by_hand():
    # domains a, b, c; stage 1 trains a, stage 2 trains b
    R = np.array([[0.5, 0.6, 0.7],
                  [0.9, 0.5, 0.4],
                  [0.8, 0.9, np.nan]])
    distance = {"domains": ["c", "b", "a"], "mmd2": [[0.0, 0.2, 0.3], [0.2, 0.0, 0.1], [0.3, 0.1, 0.0]]}
    points = forgetting_vs_distance(R, ["a", "b", "c"], [0, 1], distance)
    got = [(p["stage"], p["domain"], p["distance"], round(p["forgetting"], 6)) for p in points]
    # stage 1 (a): b drops 0.1 at d(a,b) = 0.1, c drops 0.3 at d(a,c) = 0.3; stage 2 (b): a drops 0.1 at
    # d(b,a) = 0.1, c is NaN after stage 2: no point
    assert got == [(1, "b", 0.1, 0.1), (1, "c", 0.3, 0.3), (2, "a", 0.1, 0.1)]


def _run_dir(tmp_path, tiny_model, tokenizer):
    from cptlab.models import save_model

    run = tmp_path / "run"
    cfg = load_config(None, ["eval.domains=[arithmetic,sorting,reversal]", "eval.num_prompts=12", "run.device=cpu",
                             "stages=[{domain: arithmetic, steps: 1}]"])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    save_model(tiny_model, tokenizer, run / "base")
    return run


def test_distance_verb_writes_the_matrix_and_compare_reuses_it(tmp_path, tiny_model, tokenizer, cli):
    run = _run_dir(tmp_path, tiny_model, tokenizer)
    result = cli("distance", run)
    assert result.exit_code == 0, result.output
    assert "reversal" in result.stdout and "distance.json" in result.stdout
    data = json.loads((run / "distance.json").read_text())
    assert data["domains"] == ["arithmetic", "sorting", "reversal"] and data["prompts_per_domain"] == 12
    m = np.array(data["mmd2"])
    assert np.allclose(m, m.T) and (np.diag(m) == 0).all() and (m[~np.eye(3, dtype=bool)] > 0).all()
    assert run_distance(run) == data  # read back, not recomputed
    (run / "distance.json").unlink()
    again = run_distance(run)  # missing: computed from the base model and written
    assert np.allclose(again["mmd2"], data["mmd2"]) and (run / "distance.json").is_file()
    assert run_distance(tmp_path) is None  # no run here: nothing to compute from


def test_distance_bad_input(tmp_path, tiny_model, tokenizer, cli):
    from cptlab.analysis.distance import write_distance
    from cptlab.errors import UserError

    run = _run_dir(tmp_path, tiny_model, tokenizer)
    for domains, prompts, needle in ((["arithmetic", "astrology"], None, "astrology"),
                                     (["arithmetic"], None, "at least 2"), (None, 1, "--prompts")):
        with pytest.raises(UserError, match=needle):
            write_distance(run, domains, prompts=prompts)
    assert not (run / "distance.json").exists()
    assert_one_line_error(cli("distance", tmp_path / "nope"), "not a run directory")


def test_distance_model_option_embeds_with_another_directory(tmp_path, tiny_model, tokenizer, cli):
    """--model: a run without base weights (a GGUF run keeps only base/source.json) is embedded by the
    directory given; the same weights give the same matrix; a directory without config.json is refused."""
    from cptlab.analysis.distance import write_distance
    from cptlab.errors import UserError

    run = _run_dir(tmp_path, tiny_model, tokenizer)
    _, own = write_distance(run, out=tmp_path / "own.json")
    weights = tmp_path / "weights"
    (run / "base").rename(weights)  # the run now has no base model of its own
    with pytest.raises(UserError, match="no base model"):
        write_distance(run)
    _, other = write_distance(run, model=weights)
    assert other["model"] == str(weights) and np.allclose(other["mmd2"], own["mmd2"])
    assert_one_line_error(cli("distance", run, "--model", tmp_path), "--model")


def test_compare_plots_forgetting_against_distance_from_distance_json(tmp_path):
    from cptlab.compare_page import write_compare

    runs = [make_run(tmp_path / n, name=n, seed=s) for n, s in (("grpo-s0", 0), ("grpo-s1", 1))]
    before = write_compare(runs, tmp_path / "before.html").read_text()
    assert "Forgetting against domain distance" not in before  # no distance.json and no base model
    table = {"domains": ["arithmetic", "sorting", "arithmetic_ood"],
             "mmd2": [[0.0, 0.4, 0.1], [0.4, 0.0, 0.5], [0.1, 0.5, 0.0]]}
    for run in runs:
        (run / "distance.json").write_text(json.dumps(table))
    text = write_compare(runs, tmp_path / "after.html").read_text()
    assert "Forgetting against domain distance" in text
    pngs = images(text)
    assert len(pngs) == len(images(before)) + 1 and all(p.startswith(PNG_MAGIC) for p in pngs)


def test_distance_embeds_the_prompts_the_runs_eval_read(monkeypatch, tiny_model, tokenizer):
    """With the study's \\boxed{} format, the distance embeds the eval's very prompts (the boxed
    instruction, not the <answer> one the default format would add)."""
    import cptlab.analysis.distance as D
    import cptlab.evaluate as E
    from cptlab.config import resolve_eval
    from cptlab.rollout import SamplingSpec

    cfg = load_config("smoke", ["prompt.style=full", "prompt.answer_format=boxed", "eval.num_prompts=6",
                                "eval.num_samples=0"])
    embedded, generated = {}, {}

    def fake_embeddings(model, tok, prompts, batch_size=64):
        embedded[len(embedded)] = list(prompts)
        return torch.randn(len(prompts), 3, generator=torch.Generator().manual_seed(len(embedded)))

    class Stop(Exception):
        pass

    def fake_generate(model, tok, prompts, spec, **kw):
        generated[len(generated)] = list(prompts)
        raise Stop

    monkeypatch.setattr(D, "prompt_embeddings", fake_embeddings)
    monkeypatch.setattr(E, "generate", fake_generate)
    D.domain_distance(tiny_model, tokenizer, ["gcd", "arithmetic"], cfg.prompt, cfg.eval.num_prompts)
    ecfg = resolve_eval(cfg)
    for domain in ("gcd", "arithmetic"):
        with pytest.raises(Stop):
            E.evaluate_domain(tiny_model, tokenizer, domain, ecfg, cfg.prompt, SamplingSpec.for_eval(ecfg, cfg.rollout))
    assert embedded == generated and len(embedded[0]) == 6
    assert all("\\boxed{}" in p and "<answer>" not in p for p in embedded[0] + embedded[1])


def test_pair_means_and_bins_by_hand():
    from cptlab.analysis.distance import binned, pair_means

    pts = [{"trained": "a", "domain": "b", "distance": 0.1, "forgetting": 0.2},
           {"trained": "a", "domain": "b", "distance": 0.1, "forgetting": 0.4},   # the same pair, another run
           {"trained": "a", "domain": "c", "distance": 0.9, "forgetting": -0.1},
           {"trained": "b", "domain": "c", "distance": 0.5, "forgetting": 0.0},
           {"trained": "b", "domain": "a", "distance": 0.3, "forgetting": 0.1}]
    units = pair_means(pts)
    assert [(u["trained"], u["domain"], u["points"]) for u in units] == [("a", "b", 2), ("b", "a", 1), ("b", "c", 1),
                                                                         ("a", "c", 1)]
    assert units[0]["forgetting"] == pytest.approx(0.3)
    bins = binned(units, 2)
    # pairs sorted by distance: 0.3, 0.1 | 0.0, -0.1; t interval of {0.3, 0.1}: 0.2 +- 12.706 * 0.1414 / sqrt 2
    assert [(b["n"], b["pairs"]) for b in bins] == [(2, 2), (2, 2)]
    assert bins[0]["mean"] == pytest.approx(0.2) and bins[1]["mean"] == pytest.approx(-0.05)
    assert bins[0]["high"] - bins[0]["mean"] == pytest.approx(12.7062 * 0.1, rel=1e-4)
    assert (bins[0]["low_distance"], bins[0]["high_distance"], bins[0]["distance"]) == pytest.approx((0.1, 0.3, 0.2))
    assert [b["n"] for b in binned(units, 3)] == [2, 1, 1]
