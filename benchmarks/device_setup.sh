# Source this at the start of every command on the lent GPU machine (no registry reachable there):
#     source benchmarks/device_setup.sh
# It installs cptlab's missing dependencies from the wheels carried in the git-ignored .whl/ (fetch
# them here first with `bash benchmarks/fetch_device_wheels.sh`), then puts them and src/ on PYTHONPATH.
# The machine's image already has torch, transformers, accelerate, peft, numpy, pyyaml, typer, rich,
# matplotlib and sympy. A warm machine keeps /tmp, so a second call skips the install.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.cptlab-ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 1
  # pycosat has no wheel for the machine's Python 3.12 on PyPI: build it from its sdist there. reasoning-gym
  # imports it at import time (for a logic-puzzle task cptlab does not use); if the build fails, a module
  # that refuses to solve stands in so that the import works.
  if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/pycosat-*.tar.gz \
      >/tmp/pycosat-build.log 2>&1; then
    echo "device_setup: pycosat did not build (see /tmp/pycosat-build.log); using a stand-in that refuses to solve"
    printf 'def solve(*a, **k):\n    raise RuntimeError("pycosat stand-in")\n\ndef itersolve(*a, **k):\n    raise RuntimeError("pycosat stand-in")\n' \
      > /tmp/site/pycosat.py
  fi
  touch /tmp/site/.cptlab-ready
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
