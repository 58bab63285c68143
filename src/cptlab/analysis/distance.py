"""Domain distance: how far apart two domains' prompts lie, seen through the base model.

The study behind cptlab (arXiv 2607.01763) finds forgetting an inverted U in the distance between a
domain and the trained one, measured as a maximum mean discrepancy between embeddings of the two
domains' prompts (its embedding model is not named). Here:

  embedding   the base model's own last hidden layer (`hidden_states[-1]`: the final norm's output,
              the representation the LM head reads), averaged over the prompt's tokens (padding
              excluded; position ids follow the padding so a prompt embeds alike in any batch). The
              last layer is where the base model has mixed the whole prompt into what it will act on;
              the mean over tokens rather than the last token because every prompt ends with the same
              answer prefix ("A:"), whose state says more about the template than the task.
  prompts     the domain's fixed held-out evaluation prompts (the ones forgetting is measured on),
              rendered exactly as the model reads them at evaluation (`evaluate.eval_prompts`: the
              run's prompt section, its answer format's instruction included).
  kernel      RBF, k(x, y) = exp(-||x - y||^2 / (2 s^2)), with s by the median heuristic (Gretton et
              al. 2012): the median Euclidean distance between distinct points of the pooled sample.
              For a matrix the pool is every domain's embeddings, so that one kernel serves every
              pair and the entries are comparable.
  estimator   biased (V-statistic) MMD^2 = mean k(X, X') + mean k(Y, Y') - 2 mean k(X, Y), means over
              all pairs including i = j: never negative, exactly 0 for identical sets, the squared
              RKHS distance between the two samples' mean embeddings. `unbiased=True` gives the
              U-statistic (diagonal pairs left out of the within-set means): unbiased, may be < 0.
              A set compared with itself (the same points in the same order) is one sample, not two:
              its i = j pairs are one point against itself in the cross term too, so they are left
              out there as well and the U-statistic is exactly 0.

The study's heatmap (Moenupa/SDPO-CL docs/DATA.md) shows values of 0 to 45 on a scale it does not state;
only the ordering of distances, not their size, can be set beside it.

Analysis units: the pooled points of `forgetting_vs_distance` share domain pairs across runs and
stages, so intervals are taken over `pair_means` (one unit per trained/measured domain pair), binned
by `binned`.

`distance.json` (written into a run directory by `write_distance`, the `cptlab distance` verb):
{"domains": [...], "mmd2": [[...]], "bandwidth": s, "estimator": "biased", "prompts_per_domain": n,
 "embedding": ..., "model": path}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

EMBEDDING = "mean over prompt tokens of the base model's last hidden layer"


# -- pure functions ------------------------------------------------------------------------------------
def median_bandwidth(points: Tensor) -> float:
    """Median Euclidean distance over the distinct pairs (i < j) of the rows: [N, H] -> float (N >= 2).
    torch's median: the lower of the two middle values when the number of pairs is even."""
    x = points.to(torch.float64)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float(torch.cdist(x, x)[i, j].median())


def rbf_kernel(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """exp(-||x_i - y_j||^2 / (2 s^2)): [N, H] x [M, H] -> [N, M] (float64)."""
    d2 = torch.cdist(x.to(torch.float64), y.to(torch.float64)).pow(2)
    return torch.exp(-d2 / (2 * bandwidth**2))


def mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None, unbiased: bool = False) -> float:
    """Maximum mean discrepancy squared between two samples with an RBF kernel: [N, H] x [M, H] -> float.

    bandwidth: the kernel's s (default: `median_bandwidth` of the pooled sample). Biased V-statistic by
    default; `unbiased=True` leaves the i = j pairs out of the within-sample means, and, when x and y
    are the same set (equal tensors), out of the cross mean too (the pairs of one point with itself).
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"mmd2: need at least 2 points in each sample, got {len(x)} and {len(y)}")
    s = bandwidth if bandwidth is not None else median_bandwidth(torch.cat([x, y]))
    kxx, kyy, kxy = rbf_kernel(x, x, s), rbf_kernel(y, y, s), rbf_kernel(x, y, s)
    if unbiased:
        n, m = len(x), len(y)
        within = (kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
        if x.shape == y.shape and torch.equal(x, y):  # one sample against itself: i = j is no pair
            return float(within - 2 * (kxy.sum() - kxy.trace()) / (n * (n - 1)))
        return float(within - 2 * kxy.mean())
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


def mmd_matrix(embeddings: dict[str, Tensor], unbiased: bool = False) -> tuple[list[list[float]], float]:
    """(MMD^2 between every two domains, the one bandwidth used): {domain: [N_d, H]} -> ([D][D], s)."""
    names = list(embeddings)
    s = median_bandwidth(torch.cat([embeddings[n] for n in names]))
    out = [[0.0] * len(names) for _ in names]
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            out[a][b] = out[b][a] = mmd2(embeddings[names[a]], embeddings[names[b]], s, unbiased)
    return out, s


def forgetting_vs_distance(R: np.ndarray, domains: list[str], stage_domains: list[int],
                           distance: dict) -> list[dict]:
    """One point per (stage, other domain): the domain's accuracy drop over the stage against its MMD^2 to
    the stage's trained domain.

    R [S+1, D]: accuracy after each stage (row 0 the base); stage_domains[s-1]: column of stage s's
    domain; distance: a distance.json. forgetting = R[s-1, j] - R[s, j] (positive: the stage cost domain
    j accuracy). Domains missing from either side and NaN accuracies give no point.
    """
    names, matrix = distance.get("domains") or [], distance.get("mmd2") or []
    index = {d: i for i, d in enumerate(names)}
    points = []
    for s, col in enumerate(stage_domains, start=1):
        if not 0 <= col < len(domains) or domains[col] not in index or s >= len(R):
            continue
        row = matrix[index[domains[col]]]
        for j, name in enumerate(domains):
            drop = R[s - 1, j] - R[s, j]
            if j != col and name in index and not np.isnan(drop):
                points.append({"stage": s, "trained": domains[col], "domain": name,
                               "distance": float(row[index[name]]), "forgetting": float(drop)})
    return points


def pair_means(points: list[dict]) -> list[dict]:
    """Independent units for forgetting against distance: one per (trained domain, other domain) pair.

    The points of `forgetting_vs_distance`, pooled over runs, are not independent: every run and stage
    that trains domain A measures the same pairs (A, B) on the same prompts, so a bin of many points may
    hold only a few distinct pairs. Each pair's unit is the mean drop over all its points, at the mean
    of its distances (the same value where one distance.json serves every run). Sorted by distance:
    [{trained, domain, distance, forgetting, points}]."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["trained"], p["domain"]), []).append(p)
    units = [{"trained": a, "domain": b, "distance": float(np.mean([p["distance"] for p in ps])),
              "forgetting": float(np.mean([p["forgetting"] for p in ps])), "points": len(ps)}
             for (a, b), ps in groups.items()]
    return sorted(units, key=lambda u: (u["distance"], u["trained"], u["domain"]))


def binned(units: list[dict], bins: int, level: float = 0.95) -> list[dict]:
    """Equal-count bins of `units` by distance (the first len % bins bins one larger), each with its
    distance range and mean, size, distinct pairs, and the mean drop with its t interval over the bin's
    units (stats.describe): [{low_distance, high_distance, distance, n, pairs, mean, low, high}]."""
    from .stats import describe

    units = sorted(units, key=lambda u: u["distance"])
    size, extra = divmod(len(units), bins)
    out, start = [], 0
    for b in range(bins):
        chunk = units[start:start + size + (b < extra)]
        start += len(chunk)
        if not chunk:
            continue
        s = describe([u["forgetting"] for u in chunk], level)
        out.append({"low_distance": chunk[0]["distance"], "high_distance": chunk[-1]["distance"],
                    "distance": float(np.mean([u["distance"] for u in chunk])), "n": s.n,
                    "pairs": len({(u["trained"], u["domain"]) for u in chunk}), "mean": s.mean, "low": s.low,
                    "high": s.high})
    return out


# -- the base model's embeddings -------------------------------------------------------------------------
@torch.no_grad()
def prompt_embeddings(model, tokenizer, prompts: list[str], batch_size: int = 64) -> Tensor:
    """Mean over each prompt's tokens of the model's last hidden layer: N prompts -> [N, H] float64 (CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       output_hidden_states=True).hidden_states[-1].to(torch.float64)
        weights = mask.unsqueeze(-1).to(hidden)
        out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    model.train(was_training)
    return torch.cat(out)


def domain_distance(model, tokenizer, domains: list[str], prompt_cfg, prompts_per_domain: int,
                    batch_size: int = 64) -> dict:
    """The distance.json content for `domains` (at least 2), embedded by `model`."""
    from ..evaluate import eval_prompts

    if len(domains) < 2:
        raise UserError(f"--domains: need at least 2 domains to compare, got {len(domains)}")
    emb = {d: prompt_embeddings(model, tokenizer, eval_prompts(d, prompts_per_domain, prompt_cfg, tokenizer)[1],
                                batch_size) for d in domains}
    matrix, s = mmd_matrix(emb)
    return {"domains": list(domains), "mmd2": matrix, "bandwidth": s, "estimator": "biased",
            "kernel": "rbf, median-heuristic bandwidth over all domains' embeddings",
            "embedding": EMBEDDING, "prompts_per_domain": prompts_per_domain}


# -- a run directory ---------------------------------------------------------------------------------------
def _run_config(run_dir: Path):
    from ..config import Config, from_dict
    from ..store import RunStore

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(Config, RunStore(run_dir).read_config())


def base_model_dir(run_dir: Path | str, cfg=None) -> Path | None:
    """RUN_DIR/base (the base model the run saved), else the run's model.path; None if neither is there."""
    run_dir = Path(run_dir)
    if (run_dir / "base" / "config.json").is_file():
        return run_dir / "base"
    cfg = cfg if cfg is not None else _run_config(run_dir)
    path = Path(cfg.model.path).expanduser() if cfg.model.path else None
    return path if path is not None and (path / "config.json").is_file() else None


def _plan(run_dir: Path, domains: list[str] | None, prompts: int | None, model: str | Path | None = None):
    """(config, base model directory, domains, prompts per domain) of a distance computation."""
    from ..config import eval_domains
    from ..tasks import check_domain, install_domains

    cfg = _run_config(run_dir)
    install_domains(cfg.domains)  # the run's own domain definitions (a preset's sized variants)
    if model is not None:
        model_dir = Path(model).expanduser()
        if not (model_dir / "config.json").is_file():
            raise UserError(f"--model = {model}: expected a Hugging Face model directory (with config.json)")
    else:
        model_dir = base_model_dir(run_dir, cfg)
    if model_dir is None:
        raise UserError(f"{run_dir}: no base model (neither {run_dir / 'base'} nor model.path); "
                        "expected the run directory of a cptlab run")
    names = domains or list(dict.fromkeys(eval_domains(cfg) + [s.domain for s in cfg.stages]))
    for name in names:
        check_domain(name, "--domains")
    n = prompts if prompts is not None else cfg.eval.num_prompts
    if n < 2:
        raise UserError(f"--prompts = {n}: expected an integer >= 2")
    return cfg, model_dir, names, n


def compute_distance(run_dir: Path | str, domains: list[str] | None = None, prompts: int | None = None,
                     model: str | Path | None = None) -> dict:
    """distance.json content for a run: its base model (or the model directory `model`), its evaluated and
    trained domains (or `domains`), `prompts` held-out prompts per domain (default: eval.num_prompts)."""
    from ..models import load_model, resolve_device

    cfg, model_dir, names, n = _plan(Path(run_dir), domains, prompts, model)
    model, tokenizer = load_model(str(model_dir), cfg.model, resolve_device(cfg.run.device))
    out = domain_distance(model, tokenizer, names, cfg.prompt, n, batch_size=min(cfg.rollout.batch_size, 64))
    return {**out, "model": str(model_dir)}


def run_distance(run_dir: Path | str, memo: dict | None = None) -> dict | None:
    """A run's distance.json; computed and written first when missing and its base model is there (runs
    whose base weights, domains and prompt count agree share one computation through `memo`). None when
    there is no base model to compute it from."""
    from ..store import atomic_write_json, file_digest

    run_dir = Path(run_dir)
    found = read_distance(run_dir)
    if found is not None:
        return found
    try:
        cfg, model_dir, names, n = _plan(run_dir, None, None)
    except UserError:
        return None
    memo = memo if memo is not None else {}
    key = (tuple(file_digest(f) for f in sorted(model_dir.glob("*.safetensors"))), tuple(names), n)
    if key not in memo:
        memo[key] = compute_distance(run_dir)
    atomic_write_json(run_dir / "distance.json", memo[key])
    return memo[key]


def write_distance(run_dir: Path | str, domains: list[str] | None = None, out: Path | str | None = None,
                   prompts: int | None = None, model: str | Path | None = None) -> tuple[Path, dict]:
    """Compute the run's MMD matrix and write it (default RUN_DIR/distance.json); returns (path, content)."""
    from ..store import atomic_write_json

    result = compute_distance(run_dir, domains, prompts, model)
    path = Path(out) if out else Path(run_dir) / "distance.json"
    atomic_write_json(path, result)
    return path, result


def read_distance(run_dir: Path | str) -> dict | None:
    """RUN_DIR/distance.json if it is there and well formed, else None."""
    try:
        data = json.loads((Path(run_dir) / "distance.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("domains"), list) and isinstance(data.get("mmd2"), list)
    return data if ok and len(data["mmd2"]) == len(data["domains"]) else None


def format_matrix(result: dict) -> str:
    """The MMD^2 matrix as aligned text: numbered rows named by domain, columns by the same numbers."""
    names = result["domains"]
    label = [f"{i:>2} {n}" for i, n in enumerate(names)]
    width = max(len(x) for x in label) + 1
    lines = [" " * width + "".join(f"{i:>8}" for i in range(len(names)))]
    for head, row in zip(label, result["mmd2"]):
        lines.append(f"{head:<{width}}" + "".join(f"{v:8.4f}" if math.isfinite(v) else f"{'–':>8}" for v in row))
    return "\n".join(lines)
