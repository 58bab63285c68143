"""cptlab: continual post-training of language models with on-policy methods (GRPO, SDPO, SFT),
and the analyses of what each method gains, forgets and changes."""

import os as _os

# transformers' own progress bars and advisory warnings would drown the run's output
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
