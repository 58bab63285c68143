"""Rollouts: batched sampling of completions, and log-probs of completions under a model.

The plain engine calls `transformers.generate` (KV cache, any HF causal LM). Everything downstream
sees a `Rollout` of tensors: prompts left-padded, completions right-padded, so that completion token t
sits in the same column for every row and teacher/student/reference forwards line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import gather_logprobs


@dataclass
class Rollout:
    prompt_ids: Tensor
    """[N, P] left-padded prompt tokens."""
    prompt_mask: Tensor
    """[N, P] 1 on real prompt tokens."""
    completion_ids: Tensor
    """[N, C] sampled tokens, pad after the first EOS."""
    completion_mask: Tensor
    """[N, C] float, 1.0 on generated tokens up to and including EOS."""
    texts: list[str]
    """Decoded completions (without EOS or padding)."""

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)

    def select(self, rows: slice) -> "Rollout":
        """The rows `rows` (a micro-batch), as views."""
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], self.texts[rows])


def encode_prompts(tokenizer, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and texts and texts[0].startswith(bos))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left for generation")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_mask_from_ids(completion_ids: Tensor, eos_id: int) -> Tensor:
    """1.0 on every token up to and including the first EOS (all tokens when there is none)."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def _decode(tokenizer, ids: Tensor, mask: Tensor, eos_id: int) -> list[str]:
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t != eos_id]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def use_fast_engine(model, engine: str) -> bool:
    """Whether `engine` ('auto' | 'plain' | 'fast') means the fast engine for this model."""
    from .engine import unsupported_reason
    from .errors import ConfigError

    if engine == "plain":
        return False
    reason = unsupported_reason(model)
    if engine == "fast" and reason is not None:
        raise ConfigError("rollout.engine", engine, f"'plain' or 'auto' for this model (the fast engine does not "
                          f"support {reason})")
    return reason is None


def autocast(model):
    """Autocast to the model's compute dtype on CUDA (weights stay float32 for the optimizer); nothing
    on CPU or where the compute dtype is the weights' own."""
    import contextlib

    from .models import compute_dtype

    param = next(model.parameters())
    dtype = compute_dtype(model)
    if param.device.type == "cuda" and dtype != param.dtype:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 256,
             seed: int | None = None, engine: str = "auto", cuda_graphs: bool = True) -> Rollout:
    """Sample one completion per prompt (repeat a prompt G times for a group).

    engine: 'fast' (engine.py: static KV cache, CUDA graphs), 'plain' (`transformers.generate`), or
    'auto' (fast where the architecture is supported)."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    if use_fast_engine(model, engine):
        from .engine import engine_for
        from .models import compute_dtype

        fast = engine_for(model, dtype=compute_dtype(model), device=device, cuda_graphs=cuda_graphs)

        def sample(ids, mask):
            return fast.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                 greedy=greedy, temperature=temperature, top_p=top_p)
    else:
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None, top_k=0 if not greedy else None, eos_token_id=eos_id,
            pad_token_id=pad_id, bos_token_id=None)

        def sample(ids, mask):
            with autocast(model):
                return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        comp = sample(ids, mask)
        if comp.shape[1] == 0:
            comp = torch.full((ids.shape[0], 1), eos_id, device=device, dtype=ids.dtype)
        chunks.append((ids, mask, comp))
    model.train(was_training)
    return _concat(chunks, tokenizer, eos_id, pad_id)


def _pad_to(x: Tensor, width: int, value: int, left: bool) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _concat(chunks, tokenizer, eos_id: int, pad_id: int) -> Rollout:
    P = max(c[0].shape[1] for c in chunks)
    C = max(c[2].shape[1] for c in chunks)
    prompt_ids = torch.cat([_pad_to(c[0], P, pad_id, left=True) for c in chunks])
    prompt_mask = torch.cat([_pad_to(c[1], P, 0, left=True) for c in chunks])
    comp = torch.cat([_pad_to(c[2], C, pad_id, left=False) for c in chunks])
    comp_mask = completion_mask_from_ids(comp, eos_id)
    if pad_id != eos_id:
        comp_mask = comp_mask * (comp != pad_id).float()
    # no column of padding only: every training forward is as wide as the longest completion
    used = (comp_mask.sum(0) > 0).nonzero()  # last column any row still counts (not the longest count:
    width = int(used.max()) + 1 if used.numel() else 1  # a masked-out pad mid-completion keeps its column)
    comp, comp_mask = comp[:, :width], comp_mask[:, :width]
    comp = torch.where(comp_mask > 0, comp, torch.full_like(comp, pad_id))
    return Rollout(prompt_ids, prompt_mask, comp, comp_mask, _decode(tokenizer, comp, comp_mask, eos_id))


def completion_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor) -> Tensor:
    """Logits [N, C, V] predicting each completion token, given the (left-padded) prompt."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, (completion_mask > 0).long()], dim=1)
    # positions count real tokens only, as generate() does with left padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    with autocast(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=C + 1,
                    use_cache=False)
    return out.logits[:, :-1].float()


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, batch_size: int = 256) -> Tensor:
    """Log-probs [N, C] of the completion tokens (chunked so full logits never pile up)."""
    parts = []
    for s in range(0, prompt_ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        logits = completion_logits(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl])
        parts.append(gather_logprobs(logits, completion_ids[sl]))
    return torch.cat(parts)


def rollout_from_texts(tokenizer, prompts: list[str], completions: list[str], device: torch.device,
                       add_eos: bool = True) -> Rollout:
    """A Rollout holding given completions (reference solutions for SFT and the warm-up)."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts, device)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([eos_id] if add_eos else []) for c in completions]
    C = max(len(r) for r in rows)
    comp = torch.full((len(rows), C), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(rows), C))
    for i, r in enumerate(rows):
        comp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        comp_mask[i, :len(r)] = 1.0
    return Rollout(ids, mask, comp.to(device), comp_mask.to(device), list(completions))
