#!/usr/bin/env bash
# The GPU check: one command for a GPU machine without network, about 6 minutes on an
# H100/H200, never more than GPU_CHECK_BUDGET_S (480 s, 8 minutes).
#
#   bash benchmarks/gpu_wheels.sh                               # once, on a machine with pip: .whl/
#   GPU_CHECK_COMMIT=<sha> bash benchmarks/gpu_check.sh         # on the GPU machine, in the tree's copy
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh            # the same steps on a CPU, at tiny sizes
#
# Steps, each under a time limit, each recorded with its status and time; a failing step does
# not stop the later ones, and the exit status is 1 if any failed (but the roofline):
#   wheels    the wheels in .whl/ (fvcore and its needs, which the GPU image lacks; made by
#             gpu_wheels.sh), into a scratch folder on PYTHONPATH, offline, no dependencies;
#   install   fastfusion from this tree into the same folder: offline, no build isolation, no
#             dependencies (never a second torch);
#   versions  GPU, driver, torch, triton, numpy, Python, fvcore and the commit;
#   tests     the tests of the "triton" backend (tests/helpers.py runs them on CUDA when there
#             is one, compiled: what CI checks under the interpreter), log in tests.log;
#   bench     python -m benchmarks.run --device cuda (options below);
#   roofline  python -m benchmarks.roofline --gpu h100|h200 --measured <bench JSON>; its
#             failure is recorded, not fatal to the rest;
#   summary   summary.md: versions, steps, the benchmark table, the model's error per kernel;
#             printed last.
#
# Results go to $OUT when set (the device tool brings that folder back: at most 8 files, so
# everything fits in 7: summary.md, gpu_check.log, tests.log, bench/ with the JSON, markdown and
# plot of benchmarks.run, roofline.tar.gz), else to benchmarks/results/gpu-<UTC date>/.
#
# The commit: `git rev-parse HEAD` when this is a git checkout, else GPU_CHECK_COMMIT, else the
# first line of .gpu_check_commit at the repo root (write it before copying the tree).
#
# Time budget on an H100/H200 (expected; the limits are enforced from one deadline):
#   wheels      ~5 s   pip, offline, 4 small pure-Python wheels
#   install    ~10 s   pip, offline, this tree
#   versions    ~5 s   torch import, CUDA initialisation
#   tests     ~90 s   ~230 distinct Triton specialisations (counted by running the same tests
#                      under the interpreter) compiled at ~1 s each, spread over 8 pytest-xdist
#                      workers, plus one inductor compile; limit 150 s
#   bench    ~160 s   8 kernels x float32 x 2 modes. torch.compile's warm-up dominates: a cold
#                      inductor compile took ~6 s per case on this project's 2-core CPU machine
#                      (16 cases, 100 s at tiny sizes), assumed the same on the GPU machine, so
#                      ~100 s for float32 alone; each further dtype adds as much again, which is
#                      why float32 is the only dtype by default (GPU_CHECK_BENCH_ARGS adds more).
#                      --quick halves the do_bench time per measurement (0.05 s). Gets what the
#                      deadline leaves; on SIGINT benchmarks.run keeps the rows measured so far
#   roofline  ~20 s   limit 40 s
#   summary    ~5 s
#
# Knobs (environment): GPU_CHECK_DRY_RUN=1; GPU_CHECK_BUDGET_S (480); GPU_CHECK_TESTS (pytest
# arguments); GPU_CHECK_BENCH_ARGS (arguments for benchmarks.run after --device and --out-dir);
# GPU_CHECK_GPU (h100 or h200, for the roofline; read off the device name by default);
# GPU_CHECK_COMMIT; PYTHON (python3).

# No `set -e`: a failing step is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET_S))
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${OUT:-benchmarks/results/gpu-$STAMP}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
VERSIONS=$WORK/versions.json
LOG=$RESULTS/gpu_check.log
mkdir -p "$RESULTS/bench"
: >"$STEPS"
FAILED=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# [DETAIL_FILE=f] [OPTIONAL=1] step NAME CAP RESERVE CMD...: runs CMD under `timeout`, for at
# most CAP seconds and never past the deadline less RESERVE seconds (kept for the later steps).
# SIGINT first, so that pytest and benchmarks.run report what they have; SIGKILL 10 s later.
# Records name, status, seconds and a detail in $STEPS: the last line of DETAIL_FILE, or of the
# step's own output when it failed. A failure fails the check unless OPTIONAL=1.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((DEADLINE - SECONDS - reserve - 10))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        skipped "$name" "no time left before the deadline"
        return 1
    fi
    log "$name (limit ${limit} s): $*"
    local start=$SECONDS rc status detail=""
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    local detail_file=${DETAIL_FILE:-}
    [[ -n $detail_file || $rc == 0 ]] || detail_file=$WORK/$name.out
    if [[ -s $detail_file ]]; then
        detail=$(grep -v '^\s*$' "$detail_file" | tail -n 1 | tr '\t|' '  ')
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$detail" >>"$STEPS"
    log "$name: $status after $((SECONDS - start)) s"
    [[ $rc == 0 || ${OPTIONAL:-0} == 1 ]] || FAILED=1
    return "$rc"
}

# [OPTIONAL=1] skipped NAME WHY: a step that cannot run here, recorded as such.
skipped() {
    log "$1: SKIPPED, $2"
    printf '%s\tSKIPPED\t0\t%s\n' "$1" "$2" >>"$STEPS"
    [[ ${OPTIONAL:-0} == 1 ]] || FAILED=1
}

# version KEY: a value recorded by the versions step ("" when there is none).
version() {
    "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ''))" "$VERSIONS" "$1" 2>/dev/null
}

log "results in $RESULTS, scratch in $WORK, budget $BUDGET_S s, dry run: $DRY_RUN"

# --- install ---------------------------------------------------------------------------------
SITE=$WORK/site
if [[ -d .whl ]]; then
    step wheels 60 380 \
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
else
    log "no .whl/ folder: no wheels carried (benchmarks/gpu_wheels.sh makes it)"
fi
# --no-build-isolation: the build uses the setuptools already installed, offline.
step install 60 360 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# --- versions --------------------------------------------------------------------------------
# git only when this folder is the checkout itself, not a copy that happens to lie inside another.
if [[ $(git rev-parse --show-toplevel 2>/dev/null) == "$(pwd -P)" ]]; then
    COMMIT=$(git rev-parse HEAD)$([[ -n $(git status --porcelain --untracked-files=no) ]] && echo -dirty)
elif [[ -n ${GPU_CHECK_COMMIT:-} ]]; then
    COMMIT=$GPU_CHECK_COMMIT
elif [[ -s .gpu_check_commit ]]; then
    COMMIT=$(head -n 1 .gpu_check_commit)
else
    COMMIT=unknown
fi
export FASTFUSION_GIT_COMMIT=$COMMIT # benchmarks.run's header, where git is missing

INTERPRETER=unused
if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu
    # On the CPU the Triton kernels run under the interpreter, which Triton 3.6 cannot do with
    # numpy >= 2.4 (benchmarks/gpu_check.py interpreter-ok): then no Triton test runs at all,
    # and the benchmarks go without the triton backend.
    if "$PYTHON" -m benchmarks.gpu_check interpreter-ok 2>&1 | tee -a "$LOG"; then
        export TRITON_INTERPRET=1
        INTERPRETER=ok
    else
        INTERPRETER=broken
    fi
else
    DEVICE=cuda
    unset TRITON_INTERPRET # compiled kernels: the point of the check
fi
step versions 60 330 "$PYTHON" -m benchmarks.gpu_check versions --commit "$COMMIT" --json "$VERSIONS"
if [[ $DEVICE == cuda && $(version gpu) == none ]]; then
    log "no CUDA device visible to torch: GPU_CHECK_DRY_RUN=1 runs these steps on the CPU"
    skipped tests "no CUDA device"
    skipped bench "no CUDA device"
    DEVICE=none
fi

# --- tests -----------------------------------------------------------------------------------
if [[ $INTERPRETER == broken ]]; then
    skipped tests "Triton's interpreter cannot run here (interpreter-ok in the log)"
elif [[ $DEVICE != none ]]; then
    # The tests of the "triton" backend: its own files, and its cases in the files that
    # parametrize over every backend.
    read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests/test_count_sketch.py tests/test_compact_bilinear.py tests/test_signed_sqrt_l2.py tests/test_factorized_bilinear.py tests/test_low_rank_fusion.py tests/test_tensor_fusion.py tests/test_triton_kernels.py tests/test_bad_input.py -k triton}"
    PARALLEL=()
    # Compiling the kernels is most of the time: spread over workers where xdist is installed.
    if "$PYTHON" -c "import xdist" 2>/dev/null && [[ $DEVICE == cuda ]]; then PARALLEL=(-n 8); fi
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then PARALLEL+=(--timeout 120); fi
    # tee -i: the time limit's SIGINT reaches this tee too, which must outlive pytest's report.
    # shellcheck disable=SC2016 # "$@", "$0" and PIPESTATUS belong to the inner bash
    DETAIL_FILE=$RESULTS/tests.log step tests 150 170 \
        bash -c '"$@" 2>&1 | tee -i "$0"; exit "${PIPESTATUS[0]}"' "$RESULTS/tests.log" \
        "$PYTHON" -m pytest -p no:cacheprovider -ra "${PARALLEL[@]}" "${TESTS[@]}"
fi

# --- bench -----------------------------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
    DEFAULT_BENCH=(--quick --dtypes float32)
elif [[ $DEVICE == cpu ]]; then
    # The harness's own test shapes, and dynamo without inductor: the steps, not the timings.
    DEFAULT_BENCH=(--tiny --compile-backend eager)
fi
if [[ $DEVICE != none ]]; then
    if [[ -n ${GPU_CHECK_BENCH_ARGS:-} ]]; then
        read -r -a BENCH <<<"$GPU_CHECK_BENCH_ARGS"
    else
        BENCH=("${DEFAULT_BENCH[@]}")
    fi
    if [[ $(version fvcore) == MISSING* ]]; then
        # Every row would be an error: the FLOP count of each case needs fvcore.
        skipped bench "fvcore is missing: run benchmarks/gpu_wheels.sh where pip works and carry .whl/"
    else
        step bench 600 60 "$PYTHON" -m benchmarks.run --device "$DEVICE" --out-dir "$RESULTS/bench" "${BENCH[@]}"
    fi
fi

# --- roofline --------------------------------------------------------------------------------
shopt -s nullglob
JSONS=("$RESULTS"/bench/*.json) # one: $RESULTS is new for every run
MEASURED=${JSONS[-1]:-}
GPU=${GPU_CHECK_GPU:-}
if [[ -z $GPU && $DRY_RUN == 1 ]]; then
    GPU=h100 # the model needs no GPU: the dry run exercises the call
elif [[ -z $GPU ]]; then
    case $(version gpu) in
        *H200*) GPU=h200 ;;
        *H100*) GPU=h100 ;;
    esac
fi
# The model of the same shapes, and its error per kernel against this run (in the summary);
# a failure of the model is reported, not fatal to the check of the kernels.
if [[ -z $MEASURED ]]; then
    OPTIONAL=1 skipped roofline "no benchmark JSON to compare with"
elif [[ -z $GPU ]]; then
    OPTIONAL=1 skipped roofline "the GPU is neither an H100 nor an H200 (GPU_CHECK_GPU chooses one)"
else
    OPTIONAL=1 step roofline 40 20 \
        "$PYTHON" -m benchmarks.roofline --gpu "$GPU" --measured "$MEASURED" --out-dir "$WORK/roofline"
    if [[ -d $WORK/roofline ]]; then
        tar -czf "$RESULTS/roofline.tar.gz" -C "$WORK" roofline
    fi
fi

# --- summary ---------------------------------------------------------------------------------
timeout 20 "$PYTHON" -m benchmarks.gpu_check summary --steps "$STEPS" --versions "$VERSIONS" --results "$RESULTS" \
    --roofline "$WORK/roofline" 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || FAILED=1
rm -rf "$WORK"
exit "$FAILED"
