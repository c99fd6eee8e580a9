#!/usr/bin/env bash
# Puts into .whl/ (git-ignored) the wheels that the GPU image lacks, for its Python 3.12, so that
# benchmarks/gpu_check.sh can install them there without network. Run it where pip reaches a
# package index (this project's development machines), from anywhere:
#
#   bash benchmarks/gpu_wheels.sh
#
# then carry .whl/ with the tree to the GPU machine (the device tool: carry [".whl"]).
#
# What is missing there: fastfusion.flops (the FLOP counts of benchmarks.run) needs fvcore, and
# fvcore needs iopath, yacs and termcolor, which the image lacks too. Its other requirements
# (numpy, pyyaml, tqdm, Pillow, tabulate, portalocker, typing-extensions) are in the image, as is
# everything else the GPU check runs; `benchmarks.gpu_check check-wheels` verifies that every
# requirement of every wheel here is carried or listed there (GPU_IMAGE_HAS). torch, triton and
# numpy are never carried: the check is of the image's own. The versions are the ones this
# project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=(fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0)

# Afresh: a wheel left from an older pin would make two versions of one package, which stops
# the whole install on the GPU machine.
rm -rf .whl
mkdir .whl
# `pip wheel`, not `pip download --platform`: fvcore and iopath publish source distributions
# only, which pip builds here. All four are pure Python, so a wheel built here runs on any
# Python 3; the loop below refuses any other.
"$PYTHON" -m pip wheel --no-deps --wheel-dir .whl "${WHEELS[@]}"
for wheel in .whl/*.whl; do
    if [[ $wheel != *-py3-none-any.whl && $wheel != *-py2.py3-none-any.whl ]]; then
        echo "$wheel is not a pure-Python wheel: it may not install on the GPU image's Python 3.12" >&2
        exit 1
    fi
done
"$PYTHON" -m benchmarks.gpu_check check-wheels .whl
