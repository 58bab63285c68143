"""Rollouts: batched sampling of completions, and log-probs of completions under a model.

One generation interface: `generate(model, tokenizer, prompts, spec, generator=..., group_size=G)`,
where a `SamplingSpec` says how to sample (the same object for rollouts, evaluation and drift probes)
and an explicit `torch.Generator` is the only source of randomness. The plain engine calls
`transformers.generate` (KV cache, any HF causal LM), the fast one is engine.py. Everything
downstream sees a `Rollout` of tensors: prompts left-padded, completions right-padded, so that
completion token t sits in the same column for every row and teacher/student/reference forwards line
up. Training forwards score a rollout at the temperature it was sampled at (logits / T, as verl and
TRL do), so that the log-probs are those of the policy that sampled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import EvalConfig, RolloutConfig
from .losses import contiguous_groups, gather_logprobs


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample completions: what rollouts, evaluation and drift probes pass to `generate`."""

    max_new_tokens: int
    """Completion budget in tokens (L_max: dr_grpo's normaliser is B * this)."""
    temperature: float = 1.0
    """Sampling temperature; training forwards divide logits by it too."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: the full distribution)."""
    greedy: bool = False
    """Argmax decoding (temperature and top_p are then unused)."""
    stop_ids: tuple[int, ...] | None = None
    """Token ids that end a completion (included in it); None: the model's own (`stop_token_ids`)."""
    engine: str = "auto"
    """'fast' (engine.py), 'plain' (`transformers.generate`) or 'auto' (fast where supported)."""
    cuda_graphs: bool = True
    """fast engine on CUDA: replay the decode step as a captured CUDA graph."""
    compile_decode: bool = False
    """fast engine: torch.compile the decode step's layer (fewer, fused kernels; a compile per shape)."""
    batch_size: int = 256
    """Sequences sampled at once (memory bound)."""

    @classmethod
    def for_rollout(cls, cfg: RolloutConfig) -> "SamplingSpec":
        """Training rollouts: the `rollout` section."""
        return cls(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   engine=cfg.engine, cuda_graphs=cfg.cuda_graphs, compile_decode=cfg.compile_decode,
                   batch_size=cfg.batch_size)

    @classmethod
    def for_eval(cls, ecfg: EvalConfig, rcfg: RolloutConfig) -> "SamplingSpec":
        """Evaluation: greedy with the eval budget on the rollout section's engine; `.sampled()` for the
        k samples at `eval.temperature`. A null eval budget or temperature is the rollout's (as
        config.resolve_eval fills it)."""
        return cls(max_new_tokens=rcfg.max_new_tokens if ecfg.max_new_tokens is None else ecfg.max_new_tokens,
                   temperature=rcfg.temperature if ecfg.temperature is None else ecfg.temperature, greedy=True,
                   engine=rcfg.engine, cuda_graphs=rcfg.cuda_graphs, compile_decode=rcfg.compile_decode,
                   batch_size=rcfg.batch_size)

    def sampled(self, temperature: float | None = None) -> "SamplingSpec":
        """This spec sampling (not greedy), at `temperature` if given."""
        return replace(self, greedy=False, temperature=self.temperature if temperature is None else temperature)

    def as_greedy(self) -> "SamplingSpec":
        return replace(self, greedy=True)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed` (its stream equals the global one after
    torch.manual_seed(seed), so seeded results did not change when generate stopped reseeding)."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class Rollout:
    prompt_ids: Tensor
    """[N, P] left-padded prompt tokens."""
    prompt_mask: Tensor
    """[N, P] 1 on real prompt tokens."""
    completion_ids: Tensor
    """[N, C] sampled tokens, pad after the first stop token."""
    completion_mask: Tensor
    """[N, C] float, 1.0 on generated tokens up to and including the first stop token."""
    texts: list[str]
    """Decoded completions (without stop tokens or padding)."""
    group_ids: Tensor
    """[N] long: rows with the same id are samples of the same prompt (a GRPO group, SDPO siblings)."""
    temperature: float = 1.0
    """The temperature the completions were sampled at; training forwards score them at it."""

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)

    def select(self, rows: slice) -> "Rollout":
        """The rows `rows` (a micro-batch), as views."""
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], self.texts[rows], self.group_ids[rows], self.temperature)

    def logits(self, model, prompt_ids: Tensor | None = None, prompt_mask: Tensor | None = None) -> Tensor:
        """Logits / temperature [N, C, V] predicting each completion token under `model`, after the
        rollout's own prompts or after other ones (the self-teacher's reprompts)."""
        if prompt_ids is None:
            prompt_ids, prompt_mask = self.prompt_ids, self.prompt_mask
        return completion_logits(model, prompt_ids, prompt_mask, self.completion_ids, self.completion_mask,
                                 temperature=self.temperature)

    def logprobs(self, model, batch_size: int = 256) -> Tensor:
        """Log-probs [N, C] of the completion tokens under `model` at the sampling temperature."""
        return completion_logprobs(model, self.prompt_ids, self.prompt_mask, self.completion_ids,
                                   self.completion_mask, batch_size=batch_size, temperature=self.temperature)


def encode_prompts(tokenizer, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and texts and texts[0].startswith(bos))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left for generation")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token that ends a completion: the tokenizer's EOS, every EOS id the model's generation
    config names (chat models often end a turn with another token, e.g. SmolLM2's <|im_end|>), and the
    pad token (a sampled pad ends the completion, so that training attends to exactly what the sampler
    saw)."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    ids.append(tokenizer.pad_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _up_to_first_stop(completion_ids: Tensor, stop_ids: tuple[int, ...]) -> Tensor:
    """1.0 on every token up to and including the first stop token (all tokens when there is none)."""
    stops = torch.tensor(stop_ids, dtype=completion_ids.dtype, device=completion_ids.device)
    is_stop = (completion_ids[..., None] == stops).any(-1)
    return ((is_stop.cumsum(-1) - is_stop.long()) == 0).float()


def _decode(tokenizer, ids: Tensor, mask: Tensor, stop_ids: tuple[int, ...]) -> list[str]:
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t not in stop_ids]
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


def prepare_generation(model, spec: SamplingSpec) -> None:
    """Refresh the fast engine's copy of a sharded (FSDP) model's weights, on every rank at the same
    point (a collective), so that the generate calls after it (each rank evaluating its own domains)
    run none. Nothing for an unsharded model, whose engine copies its weights on each call."""
    from .sharding import weights_version

    if weights_version(model) is None or not use_fast_engine(model, spec.engine):
        return
    from .engine import engine_for
    from .models import compute_dtype

    device = next(model.parameters()).device
    engine_for(model, dtype=compute_dtype(model), device=device, cuda_graphs=spec.cuda_graphs,
               compile=spec.compile_decode).refresh(model)


def autocast(model):
    """Autocast to the model's compute dtype on CUDA (weights stay float32 for the optimizer); nothing
    on CPU or where the compute dtype is the weights' own."""
    from .models import compute_dtype

    param = next(model.parameters())
    dtype = compute_dtype(model)
    if param.device.type == "cuda" and dtype != param.dtype:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout, LoRA's included) for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _draw_from(generator: torch.Generator | None, device: torch.device):
    """Let the block's draws come from `generator`, leaving the global RNG as it was.

    `transformers.generate` takes no generator and a captured CUDA graph replays draws from the
    device's default generator, so the default generator is lent `generator`'s state for the block
    (inside a fork, which restores it) and the advanced state goes back to `generator`.
    """
    if generator is None:
        yield
        return
    if generator.device.type != device.type:
        raise ValueError(f"generate: the generator is on {generator.device}, the model on {device}")
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], spec: SamplingSpec, *, generator: torch.Generator | None = None,
             group_size: int = 1) -> Rollout:
    """Sample `group_size` completions of each prompt: rows p*G .. p*G+G-1 are prompt p's, group p.

    Draws come from `generator` only (on the model's device; None: the global RNG, fine for greedy
    decoding, which draws nothing); the global RNG is left as it was. A completion ends at the first
    of `spec.stop_ids` (default `stop_token_ids`), which it includes."""
    device = next(model.parameters()).device
    stop_ids = spec.stop_ids if spec.stop_ids is not None else stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    rows = [p for p in prompts for _ in range(group_size)]
    group_ids = contiguous_groups(len(rows), group_size).to(device)
    if use_fast_engine(model, spec.engine):
        from .engine import engine_for
        from .models import compute_dtype

        fast = engine_for(model, dtype=compute_dtype(model), device=device, cuda_graphs=spec.cuda_graphs,
                          compile=spec.compile_decode)

        def sample(ids, mask):
            return fast.generate(model, ids, mask, max_new_tokens=spec.max_new_tokens, stop_ids=stop_ids,
                                 pad_id=pad_id, greedy=spec.greedy, temperature=spec.temperature, top_p=spec.top_p,
                                 generator=generator)
    else:
        from transformers import GenerationConfig

        greedy = spec.greedy
        gen_cfg = GenerationConfig(
            max_new_tokens=spec.max_new_tokens, do_sample=not greedy, temperature=None if greedy else spec.temperature,
            top_p=None if greedy else spec.top_p, top_k=None if greedy else 0, eos_token_id=list(stop_ids),
            pad_token_id=pad_id, bos_token_id=None)

        def sample(ids, mask):
            with autocast(model):
                return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]
    chunks = []
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generate: the generator is on {generator.device}, the model on {device}")
    # the fast engine draws from `generator` itself; transformers.generate takes none, so it is lent
    lend = contextlib.nullcontext() if use_fast_engine(model, spec.engine) else _draw_from(generator, device)
    with eval_mode(model), lend:
        for start in range(0, len(rows), spec.batch_size):
            ids, mask = encode_prompts(tokenizer, rows[start:start + spec.batch_size], device)
            comp = sample(ids, mask)
            if comp.shape[1] == 0:
                comp = torch.full((ids.shape[0], 1), stop_ids[0], device=device, dtype=ids.dtype)
            chunks.append((ids, mask, comp, _up_to_first_stop(comp, stop_ids)))
    return _concat(chunks, tokenizer, stop_ids, pad_id, group_ids, 1.0 if spec.greedy else spec.temperature)


def _pad_to(x: Tensor, width: int, value: int, left: bool) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _concat(chunks, tokenizer, stop_ids: tuple[int, ...], pad_id: int, group_ids: Tensor,
            temperature: float) -> Rollout:
    P = max(c[0].shape[1] for c in chunks)
    C = max(c[2].shape[1] for c in chunks)
    prompt_ids = torch.cat([_pad_to(c[0], P, pad_id, left=True) for c in chunks])
    prompt_mask = torch.cat([_pad_to(c[1], P, 0, left=True) for c in chunks])
    comp = torch.cat([_pad_to(c[2], C, pad_id, left=False) for c in chunks])
    comp_mask = torch.cat([_pad_to(c[3], C, 0, left=False) for c in chunks])
    # no column of padding only: every training forward is as wide as the longest completion
    width = max(1, int(comp_mask.sum(-1).max()))
    comp, comp_mask = comp[:, :width], comp_mask[:, :width]
    comp = torch.where(comp_mask > 0, comp, torch.full_like(comp, pad_id))
    return Rollout(prompt_ids, prompt_mask, comp, comp_mask, _decode(tokenizer, comp, comp_mask, stop_ids),
                   group_ids, temperature)


def completion_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Logits / temperature [N, C, V] predicting each completion token, given the (left-padded) prompt.

    In the forward's dtype (bfloat16 under autocast): the losses upcast piece by piece (losses.rowwise),
    so no float32 copy of a batch's logits is made here (with a 49k vocabulary, 256 x 128 tokens of
    them are 6.4 GB). A temperature other than 1 divides in float32, so that it costs no precision."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, (completion_mask > 0).long()], dim=1)
    # positions count real tokens only, as generate() does with left padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    with autocast(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=C + 1,
                    use_cache=False)
    logits = out.logits[:, :-1]
    return logits if temperature == 1.0 else logits.float() / temperature


SCORE_LOGIT_ELEMENTS = 1 << 28
"""Upper bound on the logits of one scoring forward (rows x completion length x vocabulary; 1 GiB in
float32): with a 49k vocabulary and 256-token completions, 256 rows at once held 13 GB of logits and
the temporaries beside them ran an H200 out of memory."""


def score_rows(model, completion_len: int, batch_size: int) -> int:
    """Rows per no-grad scoring forward: at most `batch_size`, and few enough that the chunk's logits stay
    under SCORE_LOGIT_ELEMENTS (all of them for a small vocabulary)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(batch_size, SCORE_LOGIT_ELEMENTS // max(1, completion_len * vocab)))


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, batch_size: int = 256, temperature: float = 1.0) -> Tensor:
    """Log-probs [N, C] of the completion tokens at `temperature` (chunked so full logits never pile up)."""
    parts = []
    batch_size = score_rows(model, completion_ids.shape[1], batch_size)
    for s in range(0, prompt_ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        logits = completion_logits(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl],
                                   temperature)
        parts.append(gather_logprobs(logits, completion_ids[sl]))
    return torch.cat(parts)


def rollout_from_texts(tokenizer, prompts: list[str], completions: list[str], device: torch.device,
                       add_eos: bool = True) -> Rollout:
    """A Rollout holding given completions (reference solutions for SFT and the warm-up), each row
    its own group, scored at temperature 1."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts, device)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([eos_id] if add_eos else []) for c in completions]
    C = max(len(r) for r in rows)
    comp = torch.full((len(rows), C), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(rows), C))
    for i, r in enumerate(rows):
        comp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        comp_mask[i, :len(r)] = 1.0
    return Rollout(ids, mask, comp.to(device), comp_mask.to(device), list(completions),
                   torch.arange(len(rows), device=device))
