"""Models: the tiny decoder built from a config, its character-level tokenizer, and loading any
Hugging Face causal LM from a local directory (safetensors only, nothing fetched from a hub) or from a
GGUF file (gguf_model.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError
from .tasks.answer import CLOSE, OPEN

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda': no CUDA device is available (use 'auto' or 'cpu')")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Dtype the weights are stored (and optimised) in. 'auto' is float32: on CUDA the forwards run
    in `compute_dtype` (rollout.autocast) and the fast engine samples from a copy in that dtype, while
    AdamW updates float32 weights (lr 3e-5 steps vanish in bfloat16's 8-bit mantissa)."""
    if name == "auto":
        return torch.float32
    return getattr(torch, name)


AUTO_BF16_MIN_PARAMETERS = 10_000_000
"""compute_dtype 'auto': models this large compute in bfloat16 on CUDA."""


def set_compute_dtype(model, name: str) -> None:
    """Record model.compute_dtype on the model (copies of it, teachers and references, inherit it)."""
    model.cptlab_compute_dtype = name


def compute_dtype(model) -> torch.dtype:
    """The dtype `model`'s forwards and rollouts compute in (see ModelConfig.compute_dtype)."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return param.dtype
    name = getattr(model, "cptlab_compute_dtype", "auto")
    if name == "auto":
        big = sum(p.numel() for p in model.parameters()) >= AUTO_BF16_MIN_PARAMETERS
        return torch.bfloat16 if big else torch.float32
    return getattr(torch, name)


def build_tokenizer():
    """Character-level tokenizer over printable ASCII and newline, with the answer tags as single
    tokens (short sequences keep the tiny model fast). Built offline with `tokenizers`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    specials = [PAD, EOS, UNK]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(OPEN, normalized=False), AddedToken(CLOSE, normalized=False)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")


def byte_level_form(tokenizer):
    """The same tokenizer (the same ids for every text of its characters, the same decoded text) written
    as a byte-level BPE, or None where `tokenizer` is not a character tokenizer like `build_tokenizer`'s
    (a BPE without merges, normaliser or pre-tokenizer, whose ordinary tokens are single-byte characters).

    Why: `AutoTokenizer` picks the class from config.json's model type, and for a qwen2 model
    transformers 5 loads Qwen2Tokenizer whatever tokenizer_config.json declares; that class imposes a
    byte-level pre-tokenizer and decoder, under which the character vocabulary's ' ' and '\\n' are
    unknown (a space is the byte character 'Ġ', a newline 'Ċ'), so they vanish. Spelled in byte
    characters, the vocabulary reads the same under Qwen2Tokenizer, the generic TokenizersBackend and
    PreTrainedTokenizerFast. Outside the vocabulary (a tab, a non-ASCII character) they differ: the run
    reads one <unk> per character, this spelling one <unk> per UTF-8 byte, and Qwen2Tokenizer (which
    builds its BPE without an unknown token) drops the character; the tiny model's tasks use none."""
    import json

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if (model.get("type") != "BPE" or model.get("merges") or spec.get("normalizer") or spec.get("pre_tokenizer")
            or (spec.get("decoder") or {}).get("type") != "Fuse"):
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    probe = "".join(t for t in model["vocab"] if t not in added) + "".join(sorted(added)) + " a\n b"
    byte_char = bytes_to_unicode()
    vocab = {}
    for token, i in model["vocab"].items():
        raw = token.encode()
        if token not in added and len(raw) != 1:
            return None
        vocab[token if token in added else byte_char[raw[0]]] = i
    model["vocab"] = vocab
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(tokenizer, k, None) is not None}
    out = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=tokenizer.padding_side,
                                  model_max_length=tokenizer.model_max_length, **specials)
    if getattr(tokenizer, "chat_template", None):
        out.chat_template = tokenizer.chat_template
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if out(probe, add_special_tokens=False)["input_ids"] != ids or out.decode(ids) != tokenizer.decode(ids):
        return None  # not the same tokenizer after all: keep the original
    return out


def build_tiny_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised decoder (Qwen2 or Llama architecture) with dims from `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if cfg.arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    hf_config = config_cls(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(hf_config)
    set_compute_dtype(model, cfg.compute_dtype)
    apply_training_options(model, cfg)
    return model


def apply_training_options(model, cfg: ModelConfig) -> None:
    """What the model section asks of every model it builds or loads for training (the variants that
    apply_lora or shard make later keep it): activation checkpointing."""
    if cfg.gradient_checkpointing:
        from .variants import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)


def check_model_dir(path: str) -> Path:
    """Refuse what we cannot load safely, with one line saying why."""
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        raise UserError(f"model.path = '{path}': not a directory (expected a local Hugging Face model directory)")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UserError(f"model.path = '{path}': no config.json (expected a Hugging Face model directory)")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth")):
            raise UserError(f"model.path = '{path}': only pickle weights (*.bin/*.pt); expected *.safetensors "
                            "(convert them; pickle files can run code when loaded)")
        raise UserError(f"model.path = '{path}': no *.safetensors weights found")
    return p


def _load_tokenizer(p: Path, trust_remote_code: bool):
    """AutoTokenizer picks a class from the model type (Qwen2Tokenizer for a qwen2 config), and in
    transformers 5 that class imposes its own pre-tokenizer. A directory whose tokenizer was saved from
    a plain `tokenizers` pipeline (like cptlab's character tokenizer) must be loaded as exactly that."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = p / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (p / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(p, local_files_only=True)
    return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)


def _load_adapter(p: Path, cfg: ModelConfig, device: torch.device):
    """A peft LoRA adapter directory (`cptlab export --lora adapter`): its base model, from the directory
    its adapter_config.json names, with the adapter merged in (a plain model, as evaluation wants)."""
    import json

    from .lora import require_peft

    base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not Path(base).is_dir():
        raise UserError(f"model.path = '{p}': a LoRA adapter whose base model directory '{base}' "
                        "(adapter_config.json: base_model_name_or_path) does not exist here")
    model, tokenizer = load_model(base, cfg, device)
    try:
        model = require_peft().PeftModel.from_pretrained(model, p, is_trainable=False).merge_and_unload()
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"model.path = '{p}': cannot load the adapter ({str(e).splitlines()[0][:200]})") from None
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        tokenizer = _load_tokenizer(p, cfg.trust_remote_code)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def load_model(path: str, cfg: ModelConfig, device: torch.device):
    """Model and tokenizer from a local directory; safetensors only, no hub, no remote code unless set.
    A LoRA adapter directory loads onto its base model, merged."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    if not (p / "config.json").is_file():
        return _load_adapter(p, cfg, device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        tokenizer = _load_tokenizer(p, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            p, local_files_only=True, use_safetensors=True, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    except Exception as e:  # transformers/safetensors raise many types for a bad directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path = '{path}': cannot load ({first[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    set_compute_dtype(model, cfg.compute_dtype)
    apply_training_options(model, cfg)
    return model.to(device), tokenizer


def load_pretrained(path: str, cfg: ModelConfig, device: torch.device):
    """(model, tokenizer, info) of anything `model.path` takes: a Hugging Face directory, a .gguf file,
    a directory holding one, or a packaged short name (gguf_model.py); `info` says where it came from."""
    from .gguf_model import find_gguf, load_gguf

    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_gguf(path, gguf_file, cfg, device)
    model, tokenizer = load_model(path, cfg, device)
    return model, tokenizer, {"source": "path", "path": path}


def save_model(model, tokenizer, path: str | Path) -> None:
    """Write a normal HF directory (config.json, model.safetensors, tokenizer files), atomically:
    into a temp dir that is renamed into place, so a crash never leaves half a model."""
    import shutil
    import tempfile

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: each tensor's name, dtype, shape and bytes, in sorted name order.

    Run on the float32 CPU snapshot of the base model, so that runs can be grouped by the base they
    started from (GPU warm-ups are not bitwise reproducible). 0.9 s for 135M float32 parameters on a
    2-core CPU dev box."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()
