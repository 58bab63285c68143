"""The fast rollout engine: cptlab's own decode loop for Llama/Qwen2-style decoders.

`transformers.generate` re-runs a lot of Python per token and grows its KV cache as it goes; for the
small models of a study the decode step is bound by that overhead and by kernel launches, not by
FLOPs. This engine keeps its own inference copy of the weights (QKV and gate/up fused, in the rollout
dtype), a preallocated KV cache of fixed length, and does a whole decode step (all layers, sampling,
stop bookkeeping) on tensors only, so that on CUDA the step is captured once in a CUDA graph and
replayed for every token. Prompts are left-padded, so generated column t is the same for every row.

The plain `transformers.generate` path (rollout.py) stays the reference: for any architecture this
engine does not know, and in the tests that check both give the same greedy tokens.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "qwen3")
_STOP_CHECK_EVERY = 8
"""Decode steps between the host checks whether every row has stopped (a device sync)."""


def unsupported_reason(model) -> str | None:
    """Why the engine cannot run `model` (None when it can)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        return f"activation {cfg.hidden_act!r}"
    inner = _inner(model)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no decoder layers / rotary embedding found"
    return None


def _inner(model):
    """The decoder stack (`model.model` of a *ForCausalLM), through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "model", None)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # one fused kernel; it accumulates in float32 whatever the activation dtype
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """RoPE as x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, D/2) * sin_signed
    (sin_signed = [-sin_1, sin_2]): three kernels for q and k together."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def _linear_residual(h: Tensor, a: Tensor, weight: Tensor) -> Tensor:
    """h + a @ weight.T in one matrix-product kernel (beta = 1 accumulation)."""
    return torch.addmm(h.reshape(-1, h.shape[-1]), a.reshape(-1, a.shape[-1]), weight.t()).view(h.shape)


def _layer(h: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, K: Tensor, V: Tensor, col: Tensor | None,
           w: tuple[Tensor | None, ...], shape: tuple[int, int, int, float], act) -> Tensor:
    """One decoder layer on h [B, T, hidden]; a pure function of tensors (so that torch.compile traces
    one layer and every layer reuses it) apart from the cache write. K, V [B, n_kv, L, D]: the layer's
    cache; col None: a prefill (keys/values go into columns [0, T), attention over them), else a
    decode step (T = 1; column `col` [1], attention over all L columns, `bias` masking the unused).

    Written for few kernels (the decode step is bound by launches): fused norms, q and k rotated
    together, attention as baddbmm (mask + scaled scores in one kernel) -> softmax -> bmm with
    grouped-query heads read without repeating K/V, residual adds folded into addmm."""
    norm_in, w_qkv, b_qkv, q_norm, k_norm, w_o, norm_post, w_gate_up, w_down = w
    H, KV, D, eps = shape
    B, T, _ = h.shape
    G = H // KV
    qkv = F.linear(_rms_norm(h, norm_in, eps), w_qkv, b_qkv).view(B, T, H + 2 * KV, D)
    qk, v = qkv[:, :, :H + KV], qkv[:, :, H + KV:]
    if q_norm is not None:
        qk = torch.cat([_rms_norm(qk[:, :, :H], q_norm, eps), _rms_norm(qk[:, :, H:], k_norm, eps)], dim=2)
    qk = _rotate(qk, cos, sin)
    q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    if col is None:
        K[:, :, :T].copy_(k)
        V[:, :, :T].copy_(v)
        K, V = K[:, :, :T], V[:, :, :T]
    else:  # index_copy_ as transformers' static cache writes it, the form torch.compile keeps in place
        K.index_copy_(2, col, k)
        V.index_copy_(2, col, v)
    # query heads j*G .. j*G+G-1 read kv head j: fold (kv head, group, position) into batch rows
    qg = q.reshape(B * KV, G * T, D)
    scores = torch.baddbmm(bias, qg, K.reshape(B * KV, -1, D).transpose(1, 2), alpha=D ** -0.5)
    o = torch.bmm(scores.softmax(-1), V.reshape(B * KV, -1, D)).view(B, H, T, D)
    h = _linear_residual(h, o.transpose(1, 2).reshape(B, T, H * D), w_o)
    gate, up = F.linear(_rms_norm(h, norm_post, eps), w_gate_up).chunk(2, -1)
    return _linear_residual(h, act(gate) * up, w_down)


def _fused(sd: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """The engine's tensors from a state dict with HF names: QKV and gate/up concatenated so that a
    layer is four matrix products. Missing optional tensors (biases, q/k norms, untied head) are left out."""
    out = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head"] = sd["lm_head.weight"]
    for i in range(n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out[f"{i}.norm_in"] = sd[p + "input_layernorm.weight"]
        out[f"{i}.w_qkv"] = torch.cat([sd[a + n + "_proj.weight"] for n in "qkv"])
        if a + "q_proj.bias" in sd:
            out[f"{i}.b_qkv"] = torch.cat([sd[a + n + "_proj.bias"] for n in "qkv"])
        if a + "q_norm.weight" in sd:
            out[f"{i}.q_norm"], out[f"{i}.k_norm"] = sd[a + "q_norm.weight"], sd[a + "k_norm.weight"]
        out[f"{i}.w_o"] = sd[a + "o_proj.weight"]
        out[f"{i}.norm_post"] = sd[p + "post_attention_layernorm.weight"]
        out[f"{i}.w_gate_up"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[f"{i}.w_down"] = sd[p + "mlp.down_proj.weight"]
    return out


class _Weights:
    """The engine's inference copy of the weights, refreshed in place by `sync` so that captured CUDA
    graphs keep pointing at the same storage."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        from .variants import effective_state_dict

        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.t = {k: v.detach().to(device, dtype, copy=True)
                  for k, v in _fused(effective_state_dict(model), self.n_layers).items()}
        if getattr(cfg, "tie_word_embeddings", False) or "lm_head" not in self.t:
            self.t.pop("lm_head", None)
        self.lm_head = self.t.get("lm_head", self.t["embed"])

    def get(self, layer: int, name: str) -> Tensor | None:
        return self.t.get(f"{layer}.{name}")

    def layer(self, i: int) -> tuple[Tensor | None, ...]:
        """Layer i's tensors in `_layer`'s order (None for what the model does not have)."""
        return tuple(self.get(i, n) for n in ("norm_in", "w_qkv", "b_qkv", "q_norm", "k_norm", "w_o", "norm_post",
                                              "w_gate_up", "w_down"))

    @property
    def shape(self) -> tuple[int, int, int, float]:
        return self.n_heads, self.n_kv, self.head_dim, self.eps

    @torch.no_grad()
    def sync(self, model) -> None:
        """Copy the model's current (merged) weights into the engine's buffers."""
        from .variants import effective_state_dict

        for k, v in _fused(effective_state_dict(model), self.n_layers).items():
            if k in self.t:
                self.t[k].copy_(v)


class _State:
    """Static buffers of one (batch, cache length) shape: KV cache, masks, loop counters, output."""

    def __init__(self, w: _Weights, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, w.n_kv, length, w.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(w.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(w.n_layers)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        """valid[b, c]: cache column c holds a real token of row b (prompt padding stays False)."""
        self.tok = torch.zeros(batch, dtype=torch.long, device=device)
        """The last sampled token of each row: the input of the next decode step."""
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        """Position id of `tok` (real tokens before it; left padding does not count)."""
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        """Cache column that `tok` is written to (the same for every row)."""
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        """Output column of the token the step samples."""
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.noise = torch.ones(batch, w.lm_head.shape[0], dtype=torch.float32, device=device)
        """Exp(1) draws for the next sampling step, refilled from the caller's generator before every
        step (outside a captured graph, whose replays would otherwise draw from the device's default
        generator whatever generator the caller passed)."""
        self.inv_temp = torch.ones(1, dtype=torch.float32, device=device)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}


def _sample(logits: Tensor, mode: str, inv_temp: Tensor, top_p: Tensor, noise: Tensor) -> Tensor:
    """Next tokens [B] from logits [B, V] (float32). Sampling is the exponential-race form of the
    categorical draw (argmax p / E, with `noise` E ~ Exp(1) drawn beforehand): no host sync, so it lives
    inside a CUDA graph."""
    if mode == "greedy":
        return logits.argmax(-1)
    scaled = logits * inv_temp
    if mode == "top_p":  # nucleus: keep the smallest prefix of sorted tokens with mass >= top_p
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    return (probs / noise).argmax(-1)


class DecodeEngine:
    """Batched sampling with a static KV cache (and CUDA graphs on CUDA) for one model.

    Call `generate` with left-padded prompt ids; it refreshes its weight copy from the model first,
    so it always samples from the model's current weights.
    """

    max_states = 4
    """Shapes (batch bucket, cache length) whose buffers and graphs are kept (least recently used out)."""
    length_bucket = 64
    """Cache lengths are multiples of this, batches powers of two (at least 8): few distinct shapes, so
    that a step's buffers and captured graph are reused whatever its prompts' length."""

    def __init__(self, model, *, dtype: torch.dtype, device: torch.device, cuda_graphs: bool = True,
                 compile: bool = False):
        self.dtype, self.device = dtype, device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.compiled = compile
        # one decoder layer compiled once (every layer and step reuses it; a new cache shape recompiles):
        # inductor fuses its element-wise work into fewer kernels, and a CUDA graph then captures them
        self._decode_layer = torch.compile(_layer, dynamic=False) if compile else _layer
        from .sharding import weights_version

        self.w = _Weights(model, dtype, device)
        self._synced = weights_version(model)
        cfg = model.config
        from transformers.activations import ACT2FN

        self.act = ACT2FN[getattr(cfg, "hidden_act", "silu")]
        self._rotary = _inner(model).rotary_emb
        self._positions = max(int(getattr(cfg, "max_position_embeddings", 0) or 0), 64)
        self.cos, self.sin = self._rope_table(self._positions)
        self.states: dict[tuple[int, int], _State] = {}
        self.pool = None
        self._stops: tuple[int, ...] | None = None
        self._stop_ids = torch.zeros(0, dtype=torch.long, device=device)
        self._pad = -1
        self.counts = {"states": 0, "captures": 0, "calls": 0}
        """Buffers built, CUDA graphs captured and generate calls so far: after the first steps of a
        run only `calls` should grow (a capture costs a warm-up and a graph, a state a KV cache)."""

    # -- pieces --------------------------------------------------------------------------------
    def _rope_table(self, n: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin [n, head_dim] (see _rotate) from the model's own rotary module, so any
        RoPE scaling it implements is used as is."""
        inv = getattr(self._rotary, "inv_freq", None)
        probe_device = inv.device if inv is not None else torch.device("cpu")
        x = torch.zeros(1, dtype=torch.float32, device=probe_device)
        cos, sin = self._rotary(x, torch.arange(n, device=probe_device)[None])
        cos, sin = cos[0], sin[0]
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def _layers(self, h: Tensor, pos: Tensor, allowed: Tensor, st: _State, col: Tensor | None) -> Tensor:
        """Run every layer on h [B, T, hidden] at positions pos [B, T]; returns the last layer's output
        [B, T, hidden] (before the final norm). The new keys/values go into the state's cache: columns
        [0, T) for a prefill (col None), column `col` for a decode step; `allowed` [B, T, S] says which
        of the S keys each query may see. A decode step's layers run `self._decode_layer` (compiled
        with rollout.compile_decode)."""
        w = self.w
        B, T, _ = h.shape
        G, S = w.n_heads // w.n_kv, allowed.shape[-1]
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # [B, T, 1, D]
        # additive mask per (row, kv head) batch entry: [B * KV, G * T, S]
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
        bias = bias[:, None, None].expand(B, w.n_kv, G, T, S).reshape(B * w.n_kv, G * T, S)
        layer = _layer if col is None else self._decode_layer
        for i in range(w.n_layers):
            h = layer(h, cos, sin, bias, st.k[i], st.v[i], col, w.layer(i), w.shape, self.act)
        return h

    def _logits(self, h: Tensor) -> Tensor:
        """Next-token logits (float32) from the last layer's output h [..., hidden]."""
        return F.linear(_rms_norm(h, self.w.t["final_norm"], self.w.eps), self.w.lm_head).float()

    def _prefill(self, st: _State, ids: Tensor, mask: Tensor) -> Tensor:
        """Fill cache columns [0, P) from the prompts; logits [B, V] at the last prompt column."""
        B, P = ids.shape
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        # a padding query sees itself, so that no row of the softmax is empty (its output is unused)
        allowed = (causal & mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)

        h = self._layers(self.w.t["embed"][ids], pos, allowed, st, None)
        # only the last column predicts: the head over all P columns would be a [B, P, V] float32
        # temporary (12 GB for 256 prompts of 250 tokens with a 49k vocabulary)
        return self._logits(h[:, -1])

    def _step(self, st: _State, mode: str) -> None:
        """One decode step on the state's buffers only (what a CUDA graph captures): write `tok` at
        column `col`, sample the next token into out[:, t], advance the counters."""
        st.valid.index_fill_(1, st.col, True)
        h = self._layers(self.w.t["embed"][st.tok][:, None], st.pos[:, None], st.valid[:, None, :], st, st.col)
        logits = self._logits(h[:, -1])
        nxt = _sample(logits, mode, st.inv_temp, st.top_p, st.noise)
        nxt = torch.where(st.done, torch.full_like(nxt, self._pad), nxt)
        st.out.index_copy_(1, st.t, nxt[:, None])
        st.done.logical_or_(self._is_stop(nxt))
        st.tok.copy_(nxt)
        st.pos.add_(1)
        st.col.add_(1)
        st.t.add_(1)

    def _is_stop(self, tokens: Tensor) -> Tensor:
        """Whether each token is one of the stop ids (a comparison, no host sync: graph-safe)."""
        return (tokens[:, None] == self._stop_ids[None, :]).any(-1)

    # -- state and graphs -----------------------------------------------------------------------
    def _state(self, batch: int, length: int) -> _State:
        key = (batch, length)
        st = self.states.pop(key, None)
        if st is None:
            while len(self.states) >= self.max_states:
                self.states.pop(next(iter(self.states)))
            st = _State(self.w, batch, length, self.dtype, self.device)
            self.counts["states"] += 1
        self.states[key] = st  # most recently used last
        return st

    def _run_step(self, st: _State, mode: str) -> None:
        if not self.cuda_graphs:
            self._step(st, mode)
            return
        graph = st.graphs.get(mode)
        if graph is None:
            graph = self._capture(st, mode)
        graph.replay()

    def _capture(self, st: _State, mode: str):
        """Capture one decode step (after two warm-up steps on a side stream, as CUDA graphs need).
        Warm-up and capture move the counters and write the cache; `generate` re-initialises both
        afterwards, so nothing of it reaches the output."""
        st.col.zero_()
        st.t.zero_()
        st.pos.zero_()  # a state used before holds its last positions: keep the warm-up's inside the tables
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(st, mode)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(st, mode)
        st.graphs[mode] = graph
        self.counts["captures"] += 1
        return graph

    # -- public ---------------------------------------------------------------------------------
    def refresh(self, model) -> None:
        """Copy the model's current weights into the engine. A sharded (FSDP) model's are gathered (a
        collective): only when its weights version changed since the last copy, so that once every rank
        refreshed at the same point (rollout.prepare_generation), generate calls run no collective."""
        from .sharding import weights_version

        version = weights_version(model)
        if version is None or version != self._synced:
            self.w.sync(model)
            self._synced = version

    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_id: int, greedy: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Completion ids [N, C] (C <= max_new_tokens: the loop stops once every row emitted one of
        `stop_ids`, as transformers.generate stops at any of its eos_token_id list; after its stop
        token a row holds `pad_id`)."""
        stops = tuple(int(i) for i in stop_ids)
        if (stops, pad_id) != (self._stops, self._pad):  # both are baked into captured graphs
            self._stops, self._pad = stops, pad_id
            self._stop_ids = torch.tensor(stops, dtype=torch.long, device=self.device)
            self.states.clear()
        self.refresh(model)
        N, P = prompt_ids.shape
        need = P + max_new_tokens
        if need > self._positions:
            self._positions = need
            self.cos, self.sin = self._rope_table(need)
            self.states.clear()  # captured graphs read the old tables
        self.counts["calls"] += 1
        B, L = bucket(N, need, self.length_bucket)
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, P), dtype=torch.bool, device=self.device)
        ids[:N], mask[:N] = prompt_ids.to(self.device), prompt_mask.to(self.device).bool()
        mask[N:, -1] = True  # filler rows: one real token, outputs dropped
        mode = "greedy" if greedy else ("top_p" if top_p < 1.0 else "sample")
        st = self._state(B, L)
        if self.cuda_graphs and mode not in st.graphs:
            self._capture(st, mode)
        st.inv_temp.fill_(1.0 / temperature)
        st.top_p.fill_(top_p)
        # the noise of each step comes from `generator` (None: the default one), for the N real rows only:
        # a row's draws do not depend on the bucket's filler rows (outputs dropped; their noise is stale)
        draw = mode != "greedy"
        if draw:
            st.noise[:N].exponential_(generator=generator)
        first = _sample(self._prefill(st, ids, mask), mode, st.inv_temp, st.top_p, st.noise)
        st.valid.zero_()
        st.valid[:, :P] = mask
        st.out.fill_(pad_id)
        st.out[:, 0] = first
        st.done.copy_(self._is_stop(first))
        st.tok.copy_(first)
        st.pos.copy_(mask.sum(-1))
        st.col.fill_(P)
        st.t.fill_(1)
        produced = 1
        while produced < max_new_tokens:
            if draw:
                st.noise[:N].exponential_(generator=generator)
            self._run_step(st, mode)
            produced += 1
            if produced % _STOP_CHECK_EVERY == 0 and bool(st.done[:N].all()):
                break
        return st.out[:N, :produced].clone()


def bucket(rows: int, length: int, length_bucket: int) -> tuple[int, int]:
    """(batch, cache length) of the state that serves `rows` sequences needing `length` cache columns:
    the next power of two >= max(rows, 8), and `length` rounded up to a multiple of `length_bucket`.
    The same rule with and without CUDA graphs, so the CPU tests exercise the reuse the GPU relies on."""
    return max(8, 1 << (rows - 1).bit_length()), -(-length // length_bucket) * length_bucket


_ENGINES: "weakref.WeakKeyDictionary[object, DecodeEngine]" = weakref.WeakKeyDictionary()


def engine_counts(model) -> dict | None:
    """What the model's engine has done so far (compiles, captures, replays ...), None if it has none."""
    eng = _ENGINES.get(model)
    return dict(eng.counts) if eng is not None else None


def engine_for(model, *, dtype: torch.dtype, device: torch.device, cuda_graphs: bool,
               compile: bool = False) -> DecodeEngine:
    """The model's engine (built once per model object, dtype, device, graph and compile setting)."""
    eng = _ENGINES.get(model)
    want = (dtype, device, cuda_graphs and device.type == "cuda", compile)
    if eng is None or (eng.dtype, eng.device, eng.cuda_graphs, eng.compiled) != want:
        eng = DecodeEngine(model, dtype=dtype, device=device, cuda_graphs=cuda_graphs, compile=compile)
        _ENGINES[model] = eng
    return eng
