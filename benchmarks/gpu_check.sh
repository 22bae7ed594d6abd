#!/usr/bin/env bash
# ckptguard bench on one GPU: BENCH_SIZE (default 16GiB) of bf16 state on cuda:0, the machine's
# limits (pinned/pageable D2H and H2D copies, write with fsync, cold read) and every engine that
# fits a time budget, written to RESULTS_DIR as results.json, results.md, weights.png and log.txt.
#
#   benchmarks/gpu_check.sh RESULTS_DIR
#
# Needs no network. If .whl/ holds wheels (e.g. lz4, which GPU images often lack) they are
# installed with `pip install --no-index --target /tmp/site` and put first on PYTHONPATH.
# Settings (environment):
#   BENCH_SIZE=16GiB       state per rank          BENCH_TRIALS=1   trials per engine
#   BENCH_WORKLOADS=weights                        BENCH_ENGINES=<priority order, see below>
#   BENCH_LOAD_ENGINES=ckptguard-none,torch.save,dcp.save   engines also timed on a cold load
#                          (all: every engine; at 16 GiB each load costs ~15 s of the budget)
#   BENCH_DEADLINE=285     seconds for the whole script (hard stop; partial results are kept)
#   BENCH_BUDGET=<DEADLINE-55> seconds of bench run by which the last engine trial must end
#                          (estimated from the trials so far); later engines are skipped
#   BENCH_LIMIT_SIZE=2GiB  disk-limit file size    BENCH_COPY_SIZE=4GiB   pinned copy size
#   BENCH_PAGEABLE_SIZE=1GiB  pageable copy size (0 skips pageable copies)
#   BENCH_BUILD_NATIVE=1   try to build ckptguard's native extension if this python lacks it
#   BENCH_DIR=.            where checkpoints are written (a temp folder inside it, removed after)
#   PYTHON=python3
# Engines that do not fit the budget are listed as skipped (with the reason) in the outputs.
set -u
OUT_DIR=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
PY=${PYTHON:-python3}
LOG="$OUT_DIR/log.txt"
: >"$LOG"
say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "installed wheels from .whl/ into /tmp/site"
  else
    say "could not install .whl/*.whl (see log); going on without them"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# ckptguard's native extension: build it for this python if it is missing (best effort; without
# it ckptguard runs its pure-Python path, and the log says so). BENCH_BUILD_NATIVE=0 skips this.
# Headers/libraries the image lacks (e.g. xxhash.h) may be carried as a prefix in
# .whl/native-prefix/{include,lib}; setup.py searches CKPTGUARD_NATIVE_PREFIX.
if [ -d .whl/native-prefix ]; then
  export CKPTGUARD_NATIVE_PREFIX=$PWD/.whl/native-prefix${CKPTGUARD_NATIVE_PREFIX:+:$CKPTGUARD_NATIVE_PREFIX}
  export LD_LIBRARY_PATH=$PWD/.whl/native-prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
if [ "${BENCH_BUILD_NATIVE:-1}" = 1 ] && ! $PY -c "import ckptguard._native" 2>/dev/null; then
  if timeout 90 $PY setup.py -q build_ext --inplace >>"$LOG" 2>&1; then
    say "built ckptguard's native extension"
  else
    say "could not build ckptguard's native extension (see log)"
  fi
fi
say "$($PY - <<'PYEOF' 2>&1
import sys
import torch
try:
    import ckptguard._native  # noqa: F401
    path = "native"
except Exception as exc:
    path = f"pure-Python ({type(exc).__name__}: {exc})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()}; ckptguard path: {path}")
PYEOF
)"

SIZE=${BENCH_SIZE:-16GiB}
TRIALS=${BENCH_TRIALS:-1}
WORKLOADS=${BENCH_WORKLOADS:-weights}
# Priority order: with one trial the engines run in this order until the budget is spent.
ENGINES=${BENCH_ENGINES:-ckptguard-none,torch.save,dcp.async_save+cached,dcp.save,safetensors,dcp.async_save,ckptguard-lz4,h5py}
LOAD_ENGINES=${BENCH_LOAD_ENGINES:-ckptguard-none,torch.save,dcp.save}
DEADLINE=${BENCH_DEADLINE:-285}

# Issue 6 first: the GPU tests of the async path, then its figures (benchmarks/async_check.py:
# stall vs the pinned floor, durable, streamed through a 1/8 pool, compute-loop slowdown, round
# trip). BENCH_ASYNC=0 skips both; BENCH_ASYNC_LIMIT bounds them (seconds).
if [ "${BENCH_ASYNC:-1}" = 1 ]; then
  say "GPU tests: $(timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_async.py \
    tests/test_streaming.py -k cuda 2>&1 | tee -a "$LOG" | tail -1)"
  LEFT=$((DEADLINE - ($(date +%s) - START) - 120))
  timeout --signal=TERM --kill-after=10 "$((LEFT < ${BENCH_ASYNC_LIMIT:-120} ? LEFT : ${BENCH_ASYNC_LIMIT:-120}))" \
    $PY benchmarks/async_check.py --size "$SIZE" --device cuda --dir "${BENCH_DIR:-.}" \
      --out "$OUT_DIR/async_check.json" 2>&1 | tee -a "$LOG"
  say "async check exited with ${PIPESTATUS[0]}"
fi
USED=$(($(date +%s) - START))
BUDGET=${BENCH_BUDGET:-$((DEADLINE - USED > 110 ? DEADLINE - USED - 55 : (DEADLINE - USED) / 2))}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
say "size $SIZE, trials $TRIALS, workloads $WORKLOADS, budget ${BUDGET}s, deadline ${DEADLINE}s"
say "engines (priority order): $ENGINES; cold loads for: $LOAD_ENGINES"

LEFT=$((DEADLINE - ($(date +%s) - START) - 10))
timeout --signal=TERM --kill-after=10 "$LEFT" \
  $PY -m ckptguard.bench --device cuda --size "$SIZE" --trials "$TRIALS" \
    --workloads "$WORKLOADS" --engines "$ENGINES" --load-engines "$LOAD_ENGINES" \
    --budget "$BUDGET" --limit-size "${BENCH_LIMIT_SIZE:-2GiB}" --limit-trials 1 \
    --copy-size "${BENCH_COPY_SIZE:-4GiB}" --pageable-copy-size "${BENCH_PAGEABLE_SIZE:-1GiB}" \
    --dir "${BENCH_DIR:-.}" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
say "bench exited with $RC"

# A run cut short leaves a partial results.json (written after every engine): render it.
if [ "$RC" -ne 0 ] && [ -f "$OUT_DIR/results.json" ]; then
  say "re-rendering the partial results"
  $PY -m ckptguard.bench --render "$OUT_DIR/results.json" --out "$OUT_DIR" >>"$LOG" 2>&1
fi
find . -maxdepth 1 -name 'ckptguard-bench-*' -type d -exec rm -rf {} + 2>/dev/null
say "done; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$RC"
