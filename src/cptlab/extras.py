"""Optional dependencies: which settings need which extra of `pip install cptlab[...]`, checked before
any work starts (api.run_continual), so that a LoRA run without peft fails at once with one line, not
after the warm-up. The modules that use an extra import it lazily and keep their own check as a
fallback for callers that skip this one."""

from __future__ import annotations

import importlib.util
import sys

from .errors import UserError


def installed(module: str) -> bool:
    """Whether `module` can be imported (found on the path; nothing is imported)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import of it was blocked
    return importlib.util.find_spec(module) is not None


def install_hint(extra: str) -> str:
    return f"pip install 'cptlab[{extra}]' (from a clone: pip install -e '.[{extra}]')"


def _needs(cfg) -> list[tuple[str, str, tuple[str, ...]]]:
    """(setting in words, extra, modules) for each optional feature the config uses."""
    from .gguf_model import find_gguf

    out = []
    if cfg.model.lora.rank > 0:
        out.append((f"model.lora.rank = {cfg.model.lora.rank} (LoRA)", "lora", ("peft",)))
    if cfg.model.path and find_gguf(cfg.model.path) is not None:  # a missing file or package is its own line
        out.append((f"model.path = '{cfg.model.path}' (a GGUF file)", "gguf", ("gguf", "accelerate")))
    return out


def check_extras(cfg) -> None:
    """UserError (one line, naming the setting, the missing packages and the install command) unless
    every optional package the config needs is installed."""
    for setting, extra, modules in _needs(cfg):
        missing = [m for m in modules if not installed(m)]
        if missing:
            raise UserError(f"{setting} needs {', '.join(missing)}, which is not installed: {install_hint(extra)}")
    from .trackers import require_packages

    require_packages(list(cfg.run.report_to))  # run.report_to's trackers (their extras are named alike)
