#!/usr/bin/env bash
# fastfusion against the GPU image's versions, on a CPU: Triton 3.6 and torch 2.11 (the image
# has torch 2.11.0+cu130, triton 3.6.0, numpy 2.5.2), each in a venv of its own, the Triton
# kernels under the interpreter. Run it here, where pip reaches a package index:
#
#   bash benchmarks/compat_check.sh [CONFIG...]        # default: every config below
#
# A config passes when Triton's interpreter is as usable as expected (benchmarks.gpu_check
# interpreter-ok, the probe gpu_check.sh relies on), its tests pass exactly when the
# interpreter is usable, and installing fastfusion's dev extras kept the pinned torch, triton
# and numpy. Prints one line per config; exit status 1 if any config failed.
#
# The venvs live in $COMPAT_DIR (default /tmp/fastfusion-compat) and are reused while their
# requirements are unchanged (COMPAT_FRESH=1 rebuilds them); logs beside them. PYTHON (python3)
# makes the venvs: torch==2.13.0 is this project's CPU build, for its Python 3.11.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
COMPAT_DIR=${COMPAT_DIR:-/tmp/fastfusion-compat}
TRITON_TESTS="tests/test_triton_kernels.py tests/test_bad_input.py tests/test_count_sketch.py tests/test_signed_sqrt_l2.py -k triton"
# The ops end to end in every backend, torch.compile and the module API: what a torch release
# can break. (The models, corpora and benchmark-harness tests are left out: slow, not the ops.)
OP_TESTS=$(printf 'tests/test_%s.py ' triton_kernels bad_input signed_sqrt_l2 count_sketch compact_bilinear \
    factorized_bilinear low_rank_fusion tensor_fusion compile validation backend modules module_state flops cpp_extension)

# name -> "requirements|tests|interpreter expected (ok or broken)"
declare -A CONFIGS=(
    # numpy < 2.3: the reviewer's configuration (85 Triton tests passed)
    [triton36-numpy22]="torch==2.13.0 triton==3.6.0 numpy<2.3|$TRITON_TESTS|ok"
    # numpy 2.3 still converts a 1-element array to an int (with a DeprecationWarning)
    [triton36-numpy23]="torch==2.13.0 triton==3.6.0 numpy>=2.3,<2.4|$TRITON_TESTS|ok"
    # numpy 2.4 refuses: triton-lang/triton#9171, every kernel with a loop fails
    [triton36-numpy24]="torch==2.13.0 triton==3.6.0 numpy>=2.4|$TRITON_TESTS|broken"
    # the image's torch: PyPI's build for CUDA 13, which runs on a CPU too
    [torch211-triton36]="torch==2.11.0 triton==3.6.0 numpy<2.4|$OP_TESTS|ok"
)
ORDER=(triton36-numpy22 triton36-numpy23 triton36-numpy24 torch211-triton36)

mkdir -p "$COMPAT_DIR"
FAILED=0
REPORT=()

# check NAME: builds (or reuses) the venv, runs the probe and the tests, appends to REPORT.
check() {
    local name=$1 requirements tests expected
    IFS='|' read -r requirements tests expected <<<"${CONFIGS[$name]}"
    local venv=$COMPAT_DIR/$name log=$COMPAT_DIR/$name.log py=$COMPAT_DIR/$name/bin/python
    : >"$log"
    if [[ ${COMPAT_FRESH:-0} == 1 || ! -x $py || $(cat "$venv/.requirements" 2>/dev/null) != "$requirements" ]]; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv" || return 1
        # shellcheck disable=SC2086 # the requirements are words
        "$py" -m pip install -q $requirements >>"$log" 2>&1 || { echo "$name: pip failed, see $log"; return 1; }
        local pinned
        pinned=$("$py" -m pip freeze 2>/dev/null | grep -iE '^(torch|triton|numpy)==' | sort)
        # The dev extras must leave the pinned versions alone (no second torch, no newer numpy).
        "$py" -m pip install -q -e ".[dev]" >>"$log" 2>&1 || { echo "$name: pip -e .[dev] failed, see $log"; return 1; }
        if [[ $("$py" -m pip freeze 2>/dev/null | grep -iE '^(torch|triton|numpy)==' | sort) != "$pinned" ]]; then
            echo "$name: installing .[dev] changed torch, triton or numpy (see $log)"
            return 1
        fi
        echo "$requirements" >"$venv/.requirements"
    fi
    local versions probe=ok counts verdict=ok
    versions=$("$py" -c "import torch, triton, numpy as np; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {np.__version__}')")
    "$py" -m benchmarks.gpu_check interpreter-ok >>"$log" 2>&1 || probe=broken
    local passed=yes
    # shellcheck disable=SC2086 # the tests are words
    TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider $tests >>"$log" 2>&1 || passed=no
    counts=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    if [[ $probe != "$expected" ]]; then
        verdict="FAILED: interpreter $probe, expected $expected"
    elif [[ ($probe == ok && $passed == no) || ($probe == broken && $passed == yes) ]]; then
        verdict="FAILED: tests passed: $passed, with the interpreter $probe"
    fi
    [[ $verdict == ok ]] || FAILED=1
    REPORT+=("$(printf '%-18s | %s | interpreter %s | %s | %s' "$name" "$versions" "$probe" "${counts:-no counts}" "$verdict")")
}

for name in "${@:-${ORDER[@]}}"; do
    if [[ -z ${CONFIGS[$name]:-} ]]; then
        echo "unknown config $name; choose from ${ORDER[*]}" >&2
        exit 2
    fi
    echo "[compat_check] $name ..."
    check "$name" || { FAILED=1; REPORT+=("$name | setup failed (log: $COMPAT_DIR/$name.log)"); }
done
printf '%s\n' "${REPORT[@]}"
exit "$FAILED"
