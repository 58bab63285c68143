"""cptlab: continual post-training of language models with on-policy methods (GRPO, SDPO, SFT),
and the analyses of what each method gains, forgets and changes.

    import cptlab
    run_dir = cptlab.run("smoke", overrides=["method.lr=1e-4"])   # cptlab.api.run
    results = cptlab.load_run(run_dir)                             # cptlab.results.RunResults
"""

import os as _os

# transformers' own progress bars and advisory warnings would drown the run's output
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

__all__ = ["run", "load_run", "__version__"]


def __getattr__(name: str):
    # `cptlab.run` and `cptlab.load_run` (api.py) import torch; `import cptlab` alone stays cheap
    if name in ("run", "load_run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cptlab' has no attribute {name!r}")
