"""Losses and advantages for continual post-training, as pure functions of tensors.

No model, optimizer or config is in sight here, so every function is tested against hand-computed
numbers (tests/test_losses.py). Shapes: B sequences, T completion positions, V vocabulary. `mask`
is [B, T], 1.0 on the completion tokens that count; it may carry fractional weights, and every mean
below is sum(x * mask) / sum(mask). Padded positions may hold garbage (inf, nan): it never leaks.

Notation follows the papers:
  GRPO (Shao et al. 2024, arXiv 2402.03300): G samples o_1..o_G per prompt, reward r_i, advantage
      A_i = (r_i - mean_G r) / std_G r, token ratio rho_{i,t} = pi_theta(o_{i,t}) / pi_theta_old(o_{i,t}).
  SDPO (Huebotter et al. 2026, arXiv 2601.20802): student pi_theta(. | x, y_<t) reads the plain
      prompt x; the self-teacher pi_theta(. | x, f, y_<t) is the same network reading the reprompt f
      (a successful sibling and/or feedback). Loss: sum_t D(student_t || stopgrad teacher_t).

Registries (name -> function), like verl's core_algos: POLICY_LOSSES (GRPO loss types: grpo, bnpo,
dr_grpo, dapo, cispo, gspo; `register_policy_loss`), UNITS (what a loss is a mean over) and DIVERGENCES
(SDPO divergences); `generalized_jsd` covers the reference's `alpha` knob.

Normalisation has one owner. Every loss here is `numerator / units`, and `loss_units` says what the
units are: sequences with a counted token ("grpo", "gspo"), counted tokens ("bnpo", "dapo", "cispo",
and every token-mean loss: SDPO, SFT), or the constant B * L_max ("dr_grpo", L_max the run's completion
budget). step.train_step weights each micro-batch's loss by its units over the units of the whole batch
on all ranks, so the accumulated gradient is the whole batch's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# exp() of a log-ratio beyond +-20 overflows float16 and means the sample is meaningless anyway;
# verl clamps at the same place.
_LOG_RATIO_CLAMP = 20.0
# Top-k mass is capped at 1 - 1e-7 so the tail bucket stays finite (as in the reference).
_TAIL_LOG_MASS_MAX = -1e-7


# ----------------------------------------------------------------------------- tensor helpers


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all dims if None). Values where mask == 0 are ignored, even nan/inf."""
    mask = mask.to(x.dtype)
    x = torch.where(mask != 0, x, torch.zeros_like(x))
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all dims if None); 0 where the mask is empty, never nan."""
    mask = mask.to(x.dtype)
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=torch.finfo(x.dtype).tiny)


_CHUNK_ELEMENTS = 1 << 25
"""Upper bound on the elements of one [rows, V] piece that a vocabulary-wide computation works on at a
time (128 MB in float32). Below it (a small vocabulary) everything runs at once, one kernel per
operation; above it (a 49k or 150k vocabulary) the rows are processed in pieces, so that no float32
temporary of the whole batch's logits exists, forward or backward."""


def _rows_per_piece(vocab: int) -> int:
    """Rows of a [rows, V] piece under _CHUNK_ELEMENTS (at least one)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _row_pieces(rows: tuple[Tensor, Tensor], step: int):
    """The index pairs (b_idx, t_idx) of `rows`, `step` rows at a time."""
    for s in range(0, rows[0].shape[0], step):
        yield rows[0][s:s + step], rows[1][s:s + step]


class _RowPieces(torch.autograd.Function):
    """y[n] = fn(x[b_n, t_n], *(o[b_n, t_n] for o in others)) over the rows (b_idx, t_idx) of x [B, T, V],
    piece by piece; the gradient reaches `x` only. Backward recomputes each piece's forward (the
    piece's float32 temporaries are never kept), the way fused cross-entropy kernels do; the one
    full-size tensor is x's gradient itself, in x's dtype."""

    @staticmethod
    def forward(ctx, fn, rows: int, b_idx: Tensor, t_idx: Tensor, x: Tensor, *others: Tensor) -> Tensor:
        ctx.fn, ctx.rows = fn, rows
        ctx.save_for_backward(b_idx, t_idx, x, *others)
        return torch.cat([fn(x[b, t], *(o[b, t] for o in others)) for b, t in _row_pieces((b_idx, t_idx), rows)])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        b_idx, t_idx, x, *others = ctx.saved_tensors
        grad = torch.zeros_like(x)
        for s, (b, t) in zip(range(0, b_idx.shape[0], ctx.rows), _row_pieces((b_idx, t_idx), ctx.rows)):
            piece = x[b, t].detach().requires_grad_(True)
            with torch.enable_grad():
                y = ctx.fn(piece, *(o[b, t] for o in others))
            grad[b, t] = torch.autograd.grad(y, piece, grad_out[s:s + ctx.rows])[0].to(grad.dtype)
        return (None, None, None, None, grad, *(None for _ in others))


def rowwise(fn: Callable[..., Tensor], x: Tensor, rows: tuple[Tensor, Tensor], *others: Tensor) -> Tensor:
    """fn applied to the rows `rows` = (b_idx, t_idx) of x [B, T, V]: fn([n, V], *[n, ...]) -> [n].

    `others` ([B, T, ...], no gradient) are indexed alike. For a small vocabulary this is fn on all
    rows at once under ordinary autograd; for a large one it is _RowPieces (pieces of at most
    _CHUNK_ELEMENTS, recomputed in backward)."""
    b_idx, t_idx = rows
    step = _rows_per_piece(x.shape[-1])
    if b_idx.shape[0] <= step:
        return fn(x[b_idx, t_idx], *(o[b_idx, t_idx] for o in others))
    return _RowPieces.apply(fn, step, b_idx, t_idx, x, *(o.detach() for o in others))


def _all_rows(shape: torch.Size, device) -> tuple[Tensor, Tensor]:
    B, T = shape[0], shape[1]
    return (torch.arange(B, device=device).repeat_interleave(T), torch.arange(T, device=device).repeat(B))


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_logprob(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] per row: [n, V], [n] -> [n] (upcast to float32)."""
    z = _upcast(logits)
    return z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] for each position: logits [B, T, V], tokens [B, T] -> [B, T].

    log p(y_t) = z_{y_t} - logsumexp_v z_v. Half-precision logits are upcast (per piece) and the result is
    float32. For a large vocabulary the rows go in pieces (`rowwise`): neither the forward nor the
    backward holds a float32 copy of the whole batch's logits. The log-probs are those of
    softmax(logits): for a policy that sampled at temperature T pass logits / T
    (rollout.completion_logits does).
    """
    if logits.shape[:-1] != tokens.shape or logits.dim() not in (2, 3):
        raise ValueError(f"gather_logprobs: logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} + (V,)")
    if tokens.numel() == 0:
        return logits.new_zeros(tokens.shape, dtype=_upcast(logits[:0]).dtype)
    if logits.dim() == 2:  # [N, V] rows
        return gather_logprobs(logits[None], tokens[None])[0]
    if tokens.numel() <= _rows_per_piece(logits.shape[-1]):
        return _token_logprob(logits, tokens)  # one kernel per operation on the [B, T, V] tensor as it is
    return rowwise(_token_logprob, logits, _all_rows(tokens.shape, logits.device), tokens).view(tokens.shape)


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(_upcast(logits), -1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)  # 0 log 0 = 0 (logits of -inf)


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) at each position: [..., V] -> [...] (float32 for
    half-precision logits; no gradient: a statistic). Large inputs go in pieces over the rows."""
    if logits.dim() < 2 or logits.numel() <= _CHUNK_ELEMENTS:
        return _entropy(logits)
    step = max(1, _CHUNK_ELEMENTS // max(1, logits[0].numel()))  # pieces along dim 0: views, no reshape copy
    return torch.cat([_entropy(logits[s:s + step]) for s in range(0, logits.shape[0], step)])


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token: [B, T] -> [B, T].

    k3 = exp(ref - lp) - (ref - lp) - 1 >= 0; unbiased, low variance (joschu.net/blog/kl-approx.html).
    """
    log_r = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return log_r.exp() - log_r - 1.0


def _check_same_shape(fn: str, **tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: these must have the same [B, T] shape, got {listed}")


def _zero_padding(x: Tensor | None, mask: Tensor) -> Tensor | None:
    """x with 0 where mask == 0, so garbage in padding can reach neither the loss nor the gradient."""
    return None if x is None else torch.where(mask != 0, x, torch.zeros_like(x))


def _is_weights(logprobs: Tensor | None, old_logprobs: Tensor | None, is_clip: float, fn: str) -> Tensor:
    """Detached truncated importance weight min(exp(lp - old_lp), is_clip), as in the SDPO reference."""
    if logprobs is None or old_logprobs is None:
        raise ValueError(f"{fn}: is_clip={is_clip} needs both the current and the old sampled-token log-probs")
    if is_clip <= 0:
        raise ValueError(f"{fn}: is_clip must be > 0 (or None to disable), got {is_clip}")
    log_ratio = (logprobs - old_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=is_clip)


# ----------------------------------------------------------------------------- GRPO


def contiguous_groups(batch_size: int, group_size: int) -> Tensor:
    """Group ids [B] of a batch whose groups are contiguous runs: rows g*G .. g*G+G-1 form group g.

    The one place that lays out groups (rollout.generate samples G rows per prompt this way) and the
    one check that a batch divides into them.
    """
    if group_size < 1 or batch_size % group_size != 0:
        raise ValueError(
            f"a batch of {batch_size} rows is not divisible into groups of group_size={group_size}; "
            f"expected B = n_prompts * group_size with group_size >= 1"
        )
    return torch.arange(batch_size) // group_size


def _group_matrix(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """values [B] arranged as [n_groups, G] (groups in id order) and the row index of each entry."""
    ids = group_ids.to(values.device)
    order = torch.argsort(ids, stable=True)
    sizes = torch.unique_consecutive(ids[order], return_counts=True)[1]
    if sizes.numel() and bool((sizes != sizes[0]).any()):
        raise ValueError(f"groups must all have the same size, got sizes {sorted(set(sizes.tolist()))}")
    rows = order.view(sizes.numel(), -1) if sizes.numel() else order.view(0, 0)
    return values[rows], rows


def grouped_advantages(rewards: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages keyed by group id (verl's uid): rewards [B], group_ids [B] -> [B].

    A_i = (r_i - mean_g r) / (std_g r + eps) if scale, else r_i - mean_g r (Dr. GRPO, arXiv 2503.20783),
    with g the group of row i. std is unbiased (torch.std). A group of one has no baseline: advantage 0.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"grouped_advantages: rewards and group_ids must both be [B], got "
                         f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    grouped, rows = _group_matrix(rewards.float(), group_ids)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if grouped.shape[1] > 1 else torch.zeros_like(centered)
        centered = centered / (std + eps)
    return torch.empty_like(rewards, dtype=centered.dtype).index_put_((rows.reshape(-1),), centered.reshape(-1))


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {}
"""name -> estimator(rewards [B], group_ids [B], *, scale, eps) -> advantages [B]: the registry behind
`grpo.advantage` (register_advantage adds one)."""


def register_advantage(name: str):
    """Register an advantage estimator under `name` (as verl's @register_adv_est); returns it unchanged."""
    def add(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return add


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantages (grouped_advantages): centred on the group mean, divided by
    the group std where `scale` (grpo.scale_rewards; False is Dr. GRPO)."""
    return grouped_advantages(rewards, group_ids, scale, eps)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j over
    the other samples of i's group, = G / (G - 1) * (r_i - mean_g r); never scaled (`scale` and `eps` are
    GRPO's). A group of one has no other sample: advantage 0."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rloo_advantages: rewards and group_ids must both be [B], got "
                         f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    grouped, rows = _group_matrix(rewards.float(), group_ids)
    n = grouped.shape[1]
    if n < 2:
        return torch.zeros_like(rewards, dtype=grouped.dtype)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1)
    adv = grouped - others
    return torch.empty_like(rewards, dtype=adv.dtype).index_put_((rows.reshape(-1),), adv.reshape(-1))


def zero_variance_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Share of groups whose rewards are all equal (no GRPO signal): rewards, group_ids [B] -> float."""
    grouped, _ = _group_matrix(rewards.float(), group_ids)
    return float((grouped.std(-1) == 0).float().mean()) if grouped.shape[1] > 1 else 1.0


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages: rewards [B] -> [B], B = n_prompts * group_size, groups contiguous.

    A_i = (r_i - mean_G r) / (std_G r + eps) if scale, else r_i - mean_G r (Dr. GRPO, arXiv 2503.20783).
    std is unbiased (torch.std). A group of one has no baseline to compare with: its advantage is 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    return grouped_advantages(rewards, contiguous_groups(rewards.shape[0], group_size), scale, eps)


def _sum_of_sequence_means(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum over sequences of each sequence's token mean ("sequence" units; sequences without a token
    add 0). Divided by the sequences that have tokens this is verl's seq-mean-token-mean; TRL's "grpo"
    counts token-less sequences as zeros instead. The two agree whenever every sequence has a token.
    """
    per_seq = masked_mean(per_token, mask, dim=-1)
    has_tokens = (mask.to(per_token.dtype).sum(-1) > 0).to(per_token.dtype)
    return (per_seq * has_tokens).sum()


def _sequences(mask: Tensor, budget: int | None, dtype=torch.float32) -> Tensor:
    return (mask.sum(-1) > 0).sum().to(dtype)


def _tokens(mask: Tensor, budget: int | None, dtype=torch.float32) -> Tensor:
    return mask.to(dtype).sum()


def _budget(mask: Tensor, budget: int | None, dtype=torch.float32) -> Tensor:
    return torch.tensor(float(mask.shape[0] * budget), dtype=dtype, device=mask.device)


UNITS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[..., Tensor]]] = {
    "sequence": (_sum_of_sequence_means, _sequences),  # mean over sequences of each one's token mean
    "token": (masked_sum, _tokens),                      # mean over all counted tokens
    "budget": (masked_sum, _budget),                     # sum / (rows * L_max), L_max the completion budget
}
"""What a loss is a mean over: units -> (numerator(per_token, mask), denominator(mask, L_max)). The one
normaliser: every loss here is numerator / denominator, and the trainer weights each micro-batch by
its denominator over the whole batch's on all ranks (verl's agg_loss with global counts)."""


PolicyLoss = Callable[..., Tensor]
POLICY_LOSSES: dict[str, tuple[PolicyLoss, str]] = {}
"""loss_type -> (per-token policy loss, its units): `grpo_loss(loss_type=...)` looks it up."""


def register_policy_loss(name: str, units: str):
    """Register `fn(log_ratio, adv, logprobs, mask, *, eps_low, eps_high, cispo_max_ratio) -> [B, T]`, a
    per-token policy-gradient loss, under `name`, aggregated as a mean over `units` (UNITS)."""
    if units not in UNITS:
        raise ValueError(f"register_policy_loss: units {units!r} is not one of {sorted(UNITS)}")

    def wrap(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = (fn, units)
        return fn

    return wrap


def _clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), per element (PPO's clipped surrogate)."""
    return -torch.min(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)


def _token_clipped(log_ratio, adv, logprobs, mask, *, eps_low, eps_high, cispo_max_ratio):
    """GRPO / DAPO: the clipped surrogate on each token's own ratio rho_{i,t}."""
    return _clipped_surrogate(log_ratio.exp(), adv, eps_low, eps_high)


for _name, _units_name in (("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "budget"), ("dapo", "token")):
    # grpo: sequence mean of token means; bnpo and dapo (TRL's default, over the tokens of the whole
    # batch on all processes): token mean, which is also what bnpo is here, since the trainer divides by
    # the global token count; dr_grpo: sum / (B * L_max), no length bias (Dr. GRPO, arXiv 2503.20783)
    register_policy_loss(_name, _units_name)(_token_clipped)


@register_policy_loss("cispo", "token")
def _cispo(log_ratio, adv, logprobs, mask, *, eps_low, eps_high, cispo_max_ratio):
    """CISPO (MiniMax-M1, arXiv 2506.13585), as TRL 1.16 writes it: L = -sg[min(rho, cap)] A log pi, a
    REINFORCE term weighted by the stopped, capped ratio: no token loses its gradient to a clip."""
    return -(log_ratio.exp().clamp(max=cispo_max_ratio).detach() * adv * logprobs)


@register_policy_loss("gspo", "sequence")
def _gspo(log_ratio, adv, logprobs, mask, *, eps_low, eps_high, cispo_max_ratio):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), TRL's importance_sampling_level="sequence": one ratio
    per sequence, s_i = exp(mean_t(log rho_{i,t})), clipped like PPO's and broadcast over its tokens.
    GSPO's clip range is small (TRL's docs: 3e-4 / 4e-4)."""
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    seq_adv = adv[:, :1] if adv.shape[-1] == 1 else masked_mean(adv, mask, dim=-1).unsqueeze(-1)
    return _clipped_surrogate(seq_log_ratio.exp().unsqueeze(-1), seq_adv, eps_low, eps_high).expand_as(log_ratio)


def loss_units_of(loss_type: str) -> str:
    """The units (UNITS key) a loss type's loss is a mean over."""
    if loss_type in POLICY_LOSSES:
        return POLICY_LOSSES[loss_type][1]
    if loss_type in UNITS:
        return loss_type
    raise ValueError(f"loss_type={loss_type!r} is unknown; expected one of {sorted(POLICY_LOSSES)} (or units "
                     f"{sorted(UNITS)})")


def _check_loss_type(loss_type: str, max_completion_length: int | None, fn: str) -> str:
    try:
        units = loss_units_of(loss_type)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    if units == "budget" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"{fn}: loss_type={loss_type!r} needs max_completion_length (the run's completion budget, "
                         f"rollout.max_new_tokens) >= 1, got {max_completion_length}")
    return units


def loss_units(mask: Tensor, loss_type: str, max_completion_length: int | None = None) -> float:
    """How many units `aggregate_loss(.., mask, loss_type)` is a mean over: sequences with a counted
    token ("grpo", "gspo"), counted tokens ("bnpo", "dapo", "cispo", and every token-mean loss: SDPO's,
    SFT's), or rows * max_completion_length ("dr_grpo": the run's completion budget, never the batch's
    padded width, so it is the same constant per row on every rank and micro-batch). Weighting each
    part's loss by units(part) / units(whole) sums the parts' losses to the whole's loss."""
    units = _check_loss_type(loss_type, max_completion_length, "loss_units")
    return float(UNITS[units][1](mask, max_completion_length))


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, loss_type: str,
                   max_completion_length: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar: the numerator of its units over their count (0 when
    nothing is counted). `loss_type` is a registered loss type or a units name (UNITS)."""
    units = _check_loss_type(loss_type, max_completion_length, "aggregate_loss")
    numerator, denominator = UNITS[units]
    count = denominator(mask, max_completion_length, per_token_loss.dtype).to(per_token_loss.device)
    return numerator(per_token_loss, mask) / count.clamp(min=torch.finfo(per_token_loss.dtype).tiny)


def _reduce(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None,
            reduction: str) -> Tensor:
    """The mean over the loss type's units ("mean"), or its numerator alone ("sum")."""
    if reduction == "mean":
        return aggregate_loss(per_token, mask, loss_type, max_completion_length)
    if reduction == "sum":
        return UNITS[loss_units_of(loss_type)][0](per_token, mask)
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    cispo_max_ratio: float = 5.0,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Policy-gradient loss of a registered `loss_type` (+ beta * k3 KL to a reference) -> (scalar, stats).

    logprobs, old_logprobs, mask, ref_logprobs: [B, T] (sampled-token log-probs under pi_theta,
    pi_theta_old, pi_ref); advantages: [B] (one A_i per sequence) or [B, T] (per token).
    rho = exp(lp - old_lp), eps_high = clip_eps_high or clip_eps (DAPO's clip-higher). Per token:
      grpo, bnpo, dr_grpo, dapo  L = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)
      cispo                      L = -sg[min(rho, cispo_max_ratio)] A lp          (TRL's epsilon_high)
      gspo                       the clipped surrogate on s_i = exp(mean_t log rho), per sequence
    plus beta * k3 where beta > 0, then the mean over the loss type's units (POLICY_LOSSES, UNITS):
    grpo and gspo a sequence mean of token means, bnpo / dapo / cispo a token mean, dr_grpo sum / (B *
    max_completion_length), where max_completion_length (required for dr_grpo) is the run's completion
    budget, not T. Gradients flow through `logprobs` only. reduction="sum": the numerator alone (the
    loss summed over its units), which the training step divides by the units of the whole batch.
    Stats (floats): pg_loss, kl (mean k3, when ref given), clip_fraction (share of tokens whose
    gradient the clip removed; split into _low / _high; for cispo the share capped), ratio_mean,
    approx_kl (mean old_lp - lp), advantage_mean / advantage_std, num_tokens.
    """
    _check_same_shape("grpo_loss", logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs)
    _check_loss_type(loss_type, max_completion_length, "grpo_loss")
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"grpo_loss: loss_type={loss_type!r} is not a policy loss; expected one of "
                         f"{sorted(POLICY_LOSSES)}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logprobs")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0 or not cispo_max_ratio > 0:
        raise ValueError(f"grpo_loss: need 0 <= clip_eps < 1, clip_eps_high >= 0 and cispo_max_ratio > 0, got "
                         f"{eps_low}, {eps_high}, {cispo_max_ratio}")
    if advantages.shape == logprobs.shape[:1]:
        adv = advantages.detach().unsqueeze(-1)  # A_i broadcast over the tokens of sequence i
    elif advantages.shape == logprobs.shape:
        adv = advantages.detach()
    else:
        raise ValueError(
            f"grpo_loss: advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )

    logprobs, old_logprobs, ref_logprobs = (_zero_padding(x, mask) for x in (logprobs, old_logprobs, ref_logprobs))
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # rho_{i,t}
    policy_loss, _ = POLICY_LOSSES[loss_type]
    pg_per_token = policy_loss(log_ratio, adv, logprobs, mask, eps_low=eps_low, eps_high=eps_high,
                               cispo_max_ratio=cispo_max_ratio)
    per_token = pg_per_token
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs.detach())
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = _reduce(per_token, mask, loss_type, max_completion_length, reduction)

    with torch.no_grad():
        # The min picks the (constant) clipped term exactly when the ratio left the trust region in
        # the direction the advantage pushes it: those tokens get no gradient.
        if loss_type == "cispo":  # the cap stops no gradient; count the capped tokens
            clipped_high, clipped_low = (ratio > cispo_max_ratio).float(), torch.zeros_like(ratio)
        else:
            r = ratio
            if loss_type == "gspo":
                r = masked_mean(log_ratio, mask, dim=-1).exp().unsqueeze(-1).expand_as(ratio)
            clipped_high = ((adv > 0) & (r > 1.0 + eps_high)).float()
            clipped_low = ((adv < 0) & (r < 1.0 - eps_low)).float()
        if advantages.dim() == 1:  # one A_i per sequence
            adv_mean, adv_std = adv.float().mean(), adv.float().std(unbiased=False)
        else:  # per-token advantages: moments over the counted tokens
            adv_mean = masked_mean(adv.float(), mask)
            adv_std = masked_mean((adv.float() - adv_mean) ** 2, mask).sqrt()
        stats = {
            "pg_loss": aggregate_loss(pg_per_token, mask, loss_type, max_completion_length).item(),
            "clip_fraction": masked_mean(clipped_high + clipped_low, mask).item(),
            "clip_fraction_low": masked_mean(clipped_low, mask).item(),
            "clip_fraction_high": masked_mean(clipped_high, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
            "advantage_mean": adv_mean.item(),
            "advantage_std": adv_std.item(),
            "num_tokens": mask.float().sum().item(),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask).item()
    return loss, stats


# ----------------------------------------------------------------------------- SDPO divergences


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim; terms with p_v = 0 are 0."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(pi_S || pi_T) over the last dim (mode-seeking; SDPO's default objective)."""
    return _kl(student_logp, teacher_logp)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(pi_T || pi_S) over the last dim (mass-covering, as in classic distillation)."""
    return _kl(teacher_logp, student_logp)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Generalised Jensen-Shannon divergence with the reference's convention, over the last dim.

    M = (1 - alpha) pi_S + alpha pi_T;  JSD_alpha = (1 - alpha) KL(pi_S || M) + alpha KL(pi_T || M).
    alpha = 0 and alpha = 1 are defined as forward KL(pi_T || pi_S) and reverse KL(pi_S || pi_T), as
    in lasgroup/SDPO (the mixture formula itself vanishes at both ends, like JSD_alpha / alpha).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if alpha == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    log_m = torch.logsumexp(
        torch.stack([student_logp + math.log(1.0 - alpha), teacher_logp + math.log(alpha)]), dim=0
    )
    return (1.0 - alpha) * _kl(student_logp, log_m) + alpha * _kl(teacher_logp, log_m)


def jsd(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Symmetric Jensen-Shannon divergence (mixture 0.5/0.5), bounded by log 2."""
    return generalized_jsd(student_logp, teacher_logp, 0.5)


DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": jsd,
}


def _log1m_exp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); both branches stay finite."""
    near_zero = torch.log(-torch.expm1(x))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(x > -math.log(2.0), near_zero, far)


def _with_tail(topk_logp: Tensor) -> Tensor:
    """Append the bucket log(1 - sum_k p_k) so the k + 1 entries form a distribution: [.., k] -> [.., k+1]."""
    log_mass = torch.logsumexp(topk_logp, dim=-1, keepdim=True).clamp(max=_TAIL_LOG_MASS_MAX)
    return torch.cat([topk_logp, _log1m_exp(log_mass)], dim=-1)


def _distillation_support(
    student: Tensor, teacher: Tensor, top_k: int | None, add_tail: bool, top_k_from: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-probs of student and teacher on the support the divergence is taken over: [N, V] -> [N, K].

    Full vocabulary, or the top-k ids of one side (plus a tail bucket, or renormalised without one).
    Also returns the teacher's probability mass on the top-k ids (None for the full vocabulary).
    """
    vocab = student.shape[-1]
    if top_k is None or top_k >= vocab:  # the top-V support is the full vocabulary: be exact
        return torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), None
    ids = (teacher if top_k_from == "teacher" else student).topk(top_k, dim=-1).indices
    student_k = student.gather(-1, ids) - torch.logsumexp(student, -1, keepdim=True)
    teacher_k = teacher.gather(-1, ids) - torch.logsumexp(teacher, -1, keepdim=True)
    teacher_mass = torch.logsumexp(teacher_k, -1).exp()
    if add_tail:
        return _with_tail(student_k), _with_tail(teacher_k), teacher_mass
    return torch.log_softmax(student_k, -1), torch.log_softmax(teacher_k, -1), teacher_mass


def sdpo_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: str = "reverse_kl",
    top_k: int | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    add_tail: bool = True,
    top_k_from: str = "student",
    sampled_logprobs: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    is_clip: float | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Logit-level self-distillation: D(pi_S(.|x, y_<t) || stopgrad pi_T(.|x, f, y_<t)) per token.

    student_logits, teacher_logits: [B, T, V] (teacher is detached here); mask [B, T] (multiply in
    a per-sequence "has a teacher" flag where some samples got no reprompt).
    Per token: p = softmax(logits / temperature) for both sides, then d_t = D(p_S, p_T) with
      divergence: "reverse_kl" KL(S||T) | "forward_kl" KL(T||S) | "jsd" (0.5/0.5), or
      alpha: generalized_jsd with M = (1-alpha) S + alpha T; 0 -> forward KL, 1 -> reverse KL;
             overrides `divergence` (reference default 0.5).
      top_k: the divergence runs over the top_k ids of `top_k_from` ("student", as lasgroup/SDPO
             and TRL do, or "teacher") plus, if add_tail, one bucket log(1 - sum_k p) for the rest of
             the mass; without the tail both top-k vectors are renormalised. top_k >= V is the full
             vocabulary.
      is_clip: importance weight w_t = min(exp(sampled_logprobs - old_logprobs), is_clip), detached,
             multiplies d_t (both [B, T], sampled-token log-probs under pi_theta and pi_theta_old at
             the same temperature). None disables it, as in the reference (math.inf: unclipped).
    loss = sum_t mask_t w_t d_t / sum_t mask_t (token mean over the batch, bnpo-style).
    Stats: divergence (mean d_t), student_entropy, teacher_entropy, top1_agreement, num_tokens,
    teacher_topk_mass (with top_k), is_ratio_mean / is_clip_fraction (with is_clip).
    """
    fn = "sdpo_loss"
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{fn}: student_logits and teacher_logits must both be [B, T, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"{fn}: mask must be [B, T] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    _check_same_shape(fn, mask=mask, sampled_logprobs=sampled_logprobs, old_logprobs=old_logprobs)
    if alpha is None and divergence not in DIVERGENCES:
        raise ValueError(f"{fn}: divergence={divergence!r} is unknown; expected one of {sorted(DIVERGENCES)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{fn}: alpha must be in [0, 1] (0 forward KL, 1 reverse KL), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{fn}: top_k must be >= 1 or None, got {top_k}")
    if top_k_from not in ("teacher", "student"):
        raise ValueError(f"{fn}: top_k_from must be 'teacher' or 'student', got {top_k_from!r}")

    # Only the counted positions are ever turned into distributions: [N, V] with N = #mask != 0, taken in
    # pieces for a large vocabulary (`rowwise`), so no float32 copy of the whole batch's logits exists.
    rows = (mask != 0).nonzero(as_tuple=True)
    weights = mask[rows].float()
    compute_dtype = torch.float32 if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits.dtype

    def prepare(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return student.to(compute_dtype) / temperature, teacher.to(compute_dtype) / temperature

    def divergence_of(student: Tensor, teacher: Tensor) -> Tensor:  # [n, V] rows -> d_t [n]
        student, teacher = prepare(student, teacher)
        student_logp, teacher_logp, _ = _distillation_support(student, teacher, top_k, add_tail, top_k_from)
        if alpha is not None:
            return generalized_jsd(student_logp, teacher_logp, alpha)
        return DIVERGENCES[divergence](student_logp, teacher_logp)

    teacher_logits = teacher_logits.detach()
    per_token = rowwise(divergence_of, student_logits, rows, teacher_logits)
    weighted = per_token
    is_weight = None
    if is_clip is not None:
        is_weight = _is_weights(sampled_logprobs, old_logprobs, is_clip, fn)[rows]
        weighted = per_token * is_weight
    weights = weights.to(weighted.dtype)
    loss = (weighted * weights).sum()
    if reduction == "mean":
        loss = loss / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    elif reduction != "sum":
        raise ValueError(f"{fn}: reduction={reduction!r}: expected 'mean' or 'sum'")

    with torch.no_grad():
        def token_stats(student: Tensor, teacher: Tensor) -> Tensor:  # [n, V] rows -> [n, 4]
            student, teacher = prepare(student, teacher)
            _, _, mass = _distillation_support(student, teacher, top_k, add_tail, top_k_from)
            agree = (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype)
            return torch.stack([_entropy(student), _entropy(teacher), agree,
                                mass if mass is not None else torch.ones_like(agree)], -1)

        step = _rows_per_piece(student_logits.shape[-1])
        pieces = [token_stats(student_logits[idx], teacher_logits[idx]) for idx in _row_pieces(rows, step)]
        per_row = torch.cat(pieces) if pieces else weights.new_zeros(0, 4)

        def mean(x: Tensor) -> float:
            return ((x.to(weights.dtype) * weights).sum() / weights.sum().clamp(min=1e-12)).item()

        stats = {
            "divergence": mean(per_token.detach()),
            "student_entropy": mean(per_row[:, 0]),
            "teacher_entropy": mean(per_row[:, 1]),
            "top1_agreement": mean(per_row[:, 2]),
            "num_tokens": weights.sum().item(),
        }
        if top_k is not None and top_k < student_logits.shape[-1]:
            stats["teacher_topk_mass"] = mean(per_row[:, 3])
        if is_weight is not None:
            stats["is_ratio_mean"] = mean(is_weight)
            stats["is_clip_fraction"] = mean((is_weight >= is_clip).float())
    return loss, stats


# ----------------------------------------------------------------------------- SDPO, sampled tokens


def sdpo_token_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    is_clip: float | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Sampled-token SDPO: a policy gradient whose per-token advantage comes from the self-teacher.

    logprobs, teacher_logprobs, mask, old_logprobs: [B, T], log-probs of the sampled token y_t.
    A_t = log pi_T(y_t | x, f, y_<t) - log pi_S(y_t | x, y_<t)  (detached), and
    L_t = -w_t * A_t * log pi_S(y_t) = w_t * (lp - tlp).detach() * lp, whose gradient in expectation
    over y_t ~ pi_S is that of KL(pi_S || pi_T): the reference's non-full-logit path, reverse KL only.
    w_t = min(exp(lp - old_lp), is_clip), detached, when is_clip is given.
    loss = token mean over mask. Stats: log_ratio_mean (mean lp - tlp: a one-sample estimate of the
    reverse KL), advantage_mean, num_tokens, is_ratio_mean / is_clip_fraction (with is_clip).
    """
    fn = "sdpo_token_loss"
    _check_same_shape(fn, logprobs=logprobs, teacher_logprobs=teacher_logprobs, mask=mask, old_logprobs=old_logprobs)
    logprobs, teacher_logprobs, old_logprobs = (
        _zero_padding(x, mask) for x in (logprobs, teacher_logprobs, old_logprobs)
    )
    adv = (teacher_logprobs - logprobs).detach()
    per_token = -adv * logprobs
    is_weight = None
    if is_clip is not None:
        is_weight = _is_weights(logprobs, old_logprobs, is_clip, fn)
        per_token = per_token * is_weight
    loss = masked_mean(per_token, mask) if reduction == "mean" else masked_sum(per_token, mask)
    with torch.no_grad():
        stats = {
            "log_ratio_mean": masked_mean(-adv, mask).item(),
            "advantage_mean": masked_mean(adv, mask).item(),
            "num_tokens": mask.float().sum().item(),
        }
        if is_weight is not None:
            stats["is_ratio_mean"] = masked_mean(is_weight, mask).item()
            stats["is_clip_fraction"] = masked_mean((is_weight >= is_clip).float(), mask).item()
    return loss, stats


# ----------------------------------------------------------------------------- SFT


def sft_loss(logprobs: Tensor, mask: Tensor, reduction: str = "mean") -> tuple[Tensor, dict[str, float]]:
    """Token cross-entropy: -mean over masked tokens of log p(target) (reduction "sum": the sum).
    logprobs, mask: [B, T].

    `logprobs` are the targets' log-probs (gather_logprobs(logits, labels)). Stats: nll (the mean),
    perplexity (exp nll), num_tokens.
    """
    _check_same_shape("sft_loss", logprobs=logprobs, mask=mask)
    mean = -masked_mean(logprobs, mask)
    loss = mean if reduction == "mean" else -masked_sum(logprobs, mask)
    nll = mean.detach().item()
    return loss, {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "num_tokens": mask.float().sum().item()}
