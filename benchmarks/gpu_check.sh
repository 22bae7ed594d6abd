#!/usr/bin/env bash
# ckptguard bench on one GPU, in three steps that share one hard stop (BENCH_DEADLINE, 285 s):
#   1. bench: BENCH_SIZE (16GiB) of bf16 state on cuda:0, the machine's limits (pinned/pageable
#      D2H and H2D copies, a D2H copy into fresh pageable memory, write with fsync, cold read) and
#      every engine that fits its time, in priority order: results.json, results.md, weights.png;
#   2. async: benchmarks/async_check.py at BENCH_ASYNC_SIZE (2GiB): stall vs the pinned floor,
#      streamed saves, compute-loop slowdown, round trip -> async_check.json;
#   3. tests: the CUDA tests of the async path (tests/test_async.py, test_streaming.py -k cuda).
# The bench runs first and is guaranteed its share; the async check gets a capped time; the tests
# get what is left. A step without enough time left is skipped with a message (run it alone with
# BENCH_STEPS=async,tests). Everything goes to RESULTS_DIR, with the log in log.txt.
#
#   benchmarks/gpu_check.sh RESULTS_DIR
#
# Needs no network. If .whl/ holds wheels (e.g. lz4, which GPU images often lack) they are
# installed with `pip install --no-index --target /tmp/site` and put first on PYTHONPATH.
# Settings (environment):
#   BENCH_STEPS=bench,async,tests   the steps to run (BENCH_ASYNC=0: bench only)
#   BENCH_DEADLINE=285     seconds for the whole script (hard stop; partial results are kept)
#   BENCH_SIZE=16GiB       state per rank          BENCH_TRIALS=1   trials per engine
#   BENCH_WORKLOADS=weights                        BENCH_ENGINES=<priority order, see below>
#   BENCH_LOAD_ENGINES=ckptguard-none,torch.save,dcp.save   engines also timed on a cold load
#                          (all: every engine; at 16 GiB each load costs ~15 s of the budget)
#   BENCH_RESERVE=30       seconds kept back from the bench for the async check and the tests
#   BENCH_MIN_SHARE=180    the bench's guaranteed slot, even if that leaves nothing after it
#   BENCH_BUDGET=<bench hard stop - 25>  seconds of bench run by which the last engine trial must
#                          end (estimated from the trials so far); later engines are skipped
#   BENCH_LIMIT_SIZE=2GiB  disk-limit file size    BENCH_COPY_SIZE=4GiB   pinned copy size
#   BENCH_PAGEABLE_SIZE=1GiB  pageable copy size, reused and fresh (0 skips pageable copies)
#   BENCH_ASYNC_SIZE=2GiB  state of the async check (the bench measures ckptguard-async at
#                          BENCH_SIZE)    BENCH_ASYNC_LIMIT=45   its cap in seconds
#   BENCH_TESTS_LIMIT=120  cap of the CUDA tests (they need 15 s at least)
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

DEADLINE=${BENCH_DEADLINE:-285}
TAIL=10  # kept for the cleanup and the last lines
GRACE=5  # timeout --kill-after: a step that ignores its signal is killed this much later
# Seconds left for steps before the tail; never negative.
left() {
  local l=$((DEADLINE - TAIL - ($(date +%s) - START)))
  echo $((l > 0 ? l : 0))
}
min() { echo $(($1 < $2 ? $1 : $2)); }

STEPS=${BENCH_STEPS:-bench,async,tests}
[ "${BENCH_ASYNC:-1}" = 0 ] && STEPS=bench
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if compgen -G ".whl/*.whl" >/dev/null; then
  if timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
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
say "$(timeout 30 $PY - <<'PYEOF' 2>&1
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
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  >>"$LOG" 2>&1

DIR=${BENCH_DIR:-.}
RC=0

# ---- 1. the bench, first, with its guaranteed share ----------------------------------------------
# Its slot: what is left less BENCH_RESERVE for the steps after it, but at least BENCH_MIN_SHARE
# (or all that is left). The slot holds the run (hard stop RUN), its kill grace, and RENDER s to
# re-render a partial results.json; the budget ends engine trials 25 s before the hard stop (the
# imports before the run's clock starts, a trial that overruns its estimate, the reports after).
if want bench; then
  SIZE=${BENCH_SIZE:-16GiB}
  TRIALS=${BENCH_TRIALS:-1}
  WORKLOADS=${BENCH_WORKLOADS:-weights}
  # Priority order: with one trial the engines run in this order until the budget is spent.
  ENGINES=${BENCH_ENGINES:-ckptguard-auto,ckptguard-none,ckptguard-async,safetensors,dcp.async_save+cached,torch.save,dcp.save,dcp.async_save,ckptguard-async-stream,ckptguard-lz4,h5py}
  LOAD_ENGINES=${BENCH_LOAD_ENGINES:-ckptguard-none,torch.save,dcp.save}
  RESERVE=0
  if want async || want tests; then RESERVE=${BENCH_RESERVE:-30}; fi
  RENDER=15
  L=$(left)
  SLOT=$((L - RESERVE))
  FLOOR=$(min "$L" "${BENCH_MIN_SHARE:-180}")
  [ "$SLOT" -lt "$FLOOR" ] && SLOT=$FLOOR
  RUN=$((SLOT - GRACE - RENDER))
  if [ "$RUN" -lt 60 ]; then
    say "bench skipped: ${L}s left, too little for ${SIZE} (it needs 80 s at least)"
    RC=3
  else
    BUDGET=${BENCH_BUDGET:-$((RUN - 25))}
    say "bench: size $SIZE, trials $TRIALS, workloads $WORKLOADS; slot ${SLOT}s of ${L}s left" \
      "(hard stop ${RUN}s), budget ${BUDGET}s"
    say "engines (priority order): $ENGINES; cold loads for: $LOAD_ENGINES"
    timeout --signal=TERM --kill-after="$GRACE" "$RUN" \
      $PY -m ckptguard.bench --device cuda --size "$SIZE" --trials "$TRIALS" \
        --workloads "$WORKLOADS" --engines "$ENGINES" --load-engines "$LOAD_ENGINES" \
        --budget "$BUDGET" --limit-size "${BENCH_LIMIT_SIZE:-2GiB}" --limit-trials 1 \
        --copy-size "${BENCH_COPY_SIZE:-4GiB}" --pageable-copy-size "${BENCH_PAGEABLE_SIZE:-1GiB}" \
        --dir "$DIR" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
    RC=${PIPESTATUS[0]}
    say "bench exited with $RC"
    # A run cut short leaves a partial results.json (written after every engine): render it.
    if [ "$RC" -ne 0 ] && [ -f "$OUT_DIR/results.json" ]; then
      say "re-rendering the partial results"
      timeout --kill-after="$GRACE" "$((RENDER - GRACE))" \
        $PY -m ckptguard.bench --render "$OUT_DIR/results.json" --out "$OUT_DIR" >>"$LOG" 2>&1
    fi
  fi
  find "$DIR" -maxdepth 1 -name 'ckptguard-bench-*' -type d -exec rm -rf {} + 2>/dev/null
fi

# ---- 2. the async check, capped -------------------------------------------------------------------
# At the cap it gets SIGTERM, turned into KeyboardInterrupt so that async_check.py writes what it
# measured so far (its finally block); SIGKILL GRACE s later if it has not exited.
INTERRUPTIBLE='import runpy, signal, sys
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")'
if want async; then
  ASYNC_SIZE=${BENCH_ASYNC_SIZE:-2GiB}
  A=$(min "${BENCH_ASYNC_LIMIT:-45}" $(($(left) - GRACE)))
  if [ "$A" -lt 20 ]; then
    say "async check skipped: $(left)s left, it needs 20 s (+${GRACE}s grace);" \
      "run it alone: BENCH_STEPS=async,tests benchmarks/gpu_check.sh DIR"
  else
    say "async check: size $ASYNC_SIZE, at most ${A}s"
    timeout --signal=TERM --kill-after="$GRACE" "$A" $PY -c "$INTERRUPTIBLE" \
      benchmarks/async_check.py --size "$ASYNC_SIZE" --device cuda --dir "$DIR" \
        --out "$OUT_DIR/async_check.json" 2>&1 | tee -a "$LOG"
    say "async check exited with ${PIPESTATUS[0]}"
  fi
  find "$DIR" -maxdepth 1 -name 'ckptguard-async-*' -type d -exec rm -rf {} + 2>/dev/null
fi

# ---- 3. the CUDA tests, with what is left ----------------------------------------------------------
if want tests; then
  T=$(min "${BENCH_TESTS_LIMIT:-120}" $(($(left) - GRACE)))
  if [ "$T" -lt 15 ]; then
    say "GPU tests skipped: $(left)s left, they need 15 s (+${GRACE}s grace);" \
      "run them alone: BENCH_STEPS=tests benchmarks/gpu_check.sh DIR"
  else
    say "GPU tests: at most ${T}s"
    timeout --kill-after="$GRACE" "$T" $PY -m pytest -q -p no:cacheprovider \
      tests/test_async.py tests/test_streaming.py -k cuda >"$OUT_DIR/gpu_tests.txt" 2>&1
    TRC=$?
    cat "$OUT_DIR/gpu_tests.txt" >>"$LOG"
    say "GPU tests exited with $TRC: $(tail -1 "$OUT_DIR/gpu_tests.txt")"
    [ "$RC" -eq 0 ] && RC=$TRC
  fi
fi

say "done; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$RC"
