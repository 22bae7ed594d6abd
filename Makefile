# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
# A bare torch range pulls a multi-GB CUDA build; this CPU build lies on the project's machines.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint install install-test bench clean native-deps native test-native slurm postgres chromium faults

$(VENV)/.base: pyproject.toml setup.py | native-deps
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[mpi,bench,mlflow]"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[mpi,bench,test,mlflow,s3]"
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: install
	$(VENV)/bin/ckptguard demo --store ./ckpts
	$(PY) examples/distributed_demo.py --store ./ckpts-sharded
	$(PY) examples/mlflow_demo.py --dir ./mlflow-demo
	$(VENV)/bin/ckptguard drill ./ckpts --seed 1
	$(VENV)/bin/ckptguard report ./ckpts --out ./ckpts-report

# Style (Python and C, .clang-format), the import rules (pyproject.toml [tool.importlinter]), the
# types, and the extension's stub against the built extension (where both exist).
lint: install-test
	$(VENV)/bin/ruff check ckptguard tests benchmarks examples
	$(VENV)/bin/ruff format --check ckptguard tests benchmarks examples
	$(VENV)/bin/clang-format --dry-run -Werror native/*.c native/*.h native/tests/*.c
	cd $(CURDIR) && $(VENV)/bin/lint-imports
	$(PY) -m mypy

# The whole suite on the native backend, then again on the pure-Python one (CKPTGUARD_NATIVE=0,
# inherited by every process a test starts). The second pass leaves out the tests marked
# backend_independent (tests/conftest.py): static checks and tests that pick their backend
# themselves, which the first pass already ran on both, and tests that never encode or read a
# record, and the framework jobs marked framework_job (tests/conftest.py: training runs under
# torchrun whose saves take the same paths; each framework keeps its in-process tests and, where
# cheap, one bitwise resume on both backends), the jobs of several ranks marked rank_job (whose
# subject is coordination, a handover or a launcher, not the backend; representatives stay), the
# fault cases whose failpoint does not interrupt the backend's own writes, and tests of timeouts,
# signals and races. On a 2-core machine whose
# disk rate varies from day to day: the native pass 52 minutes, the pure-Python one 12, `make
# test` from a fresh clone 70, setup included (2026-12-05, over the 45-minute budget; the fault
# matrix runs a sample of each scenario here, all of it in `make faults`). Each pass
# prints its 30 slowest tests and writes every test's time to build/junit-native.xml and
# build/junit-pure.xml.
# The extension is rebuilt first, so that the stub check (tests/test_native.py::test_stub_matches,
# stubtest of ckptguard/_native.pyi) and the suite run against the current native/ sources.
test: native lint test-native slurm postgres chromium
	$(PY) -m pytest -q --durations=30 --junitxml=build/junit-native.xml
	CKPTGUARD_NATIVE=0 $(PY) -m pytest -q --durations=30 --junitxml=build/junit-pure.xml \
	  -m "not backend_independent and not framework_job and not rank_job"

# Every failpoint x every rank that reaches it x kill/eio/enospc/hang (tests/fault_cases.txt;
# `make test` runs a subset). Writes the counts to build/faults-summary.md and .json. Then saves
# and loads by 16 and 32 MPI ranks (minutes on a small machine), node-local saves, their
# protection, rebuild and drain failing at each of their points and both schemes throughout
# (tests/test_localcommit.py, test_protect.py, test_resume.py, test_nodedrain.py), then 100,000
# fuzzed inputs across the parsers and decoders (tests/fuzz/run.py; atheris if it installs).
# docs/reliability.md.
faults: install-test
	@mkdir -p build
	CKPTGUARD_FAULTS=all CKPTGUARD_FAULTS_SUMMARY=build/faults-summary \
	  $(PY) -m pytest -q tests/test_fault_matrix.py
	CKPTGUARD_FAULTS=all $(PY) -m pytest -q tests/test_distributed.py -k many_ranks
	CKPTGUARD_FAULTS=all $(PY) -m pytest -q tests/test_localcommit.py tests/test_protect.py \
	  tests/test_resume.py tests/test_protect_async.py tests/test_nodedrain.py
	$(PIP) atheris || echo "faults: atheris did not install; the fuzzer uses its seeded mutator"
	$(PY) tests/fuzz/run.py --inputs 100000

# A real single-node Slurm cluster (Debian's slurm-wlm + munge) for the srun tests; needs root and
# apt-get, elsewhere those tests skip (and fail under CI=true). slurm/README.md.
slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  bash slurm/local-cluster.sh start; \
	else echo "slurm: not root or no apt-get; the Slurm tests skip (slurm/README.md)"; fi

# A PostgreSQL server of its own (Debian's postgresql-15, port 55432) for the MLflow tests; the
# tests start it themselves too. Needs root; elsewhere those tests skip (and fail under CI=true).
postgres:
	@if [ "$$(id -u)" = 0 ]; then bash services/postgres.sh start; \
	else echo "postgres: not root; the MLflow tests on PostgreSQL skip (services/postgres.sh)"; fi

# Headless Chromium renders `ckptguard report`'s page in tests/test_report_html.py (which fails
# under CI=true without it). Installed as root only where it is missing; a non-root machine skips.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	else echo "chromium: not root; the report's rendering test skips (apt-get install chromium)"; fi

# BENCH_ARGS adds options, e.g. BENCH_ARGS="--congestion dd" for loaded trials beside the quiet
# ones (twice the trials: within the same budget, later ones are skipped and listed).
BENCH_ARGS ?=
bench: install
	$(VENV)/bin/ckptguard bench --size 1GiB --budget 510 --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ckpts ckpts-sharded ckpts-report mlflow-demo .pytest_cache

# ---- native chunk pipeline (native/, ckptguard._native; docs/native.md) ----
# System LZ4, zstd, xxHash and OpenSSL (libcrypto: SHA-256) headers for the extension. Without apt-get or root nothing is
# installed: the extension is then skipped with a warning and ckptguard runs on its pure-Python path.
native-deps:
	@if dpkg -s liblz4-dev libzstd-dev libxxhash-dev libssl-dev >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    liblz4-dev libzstd-dev libxxhash-dev libssl-dev) || echo "native-deps: apt-get failed; pure-Python path"; \
	else echo "native-deps: no apt-get or not root: install liblz4, zstd, xxhash and openssl (docs/native.md)"; fi

NATIVE_SRC := native/chunk.c native/digest.c native/pipeline.c native/pool.c native/io.c native/seal.c
NATIVE_DEPS := $(NATIVE_SRC) native/module.c native/ckg.h native/pipeline.h
NATIVE_OUT := build/native-tests
NATIVE_LIBS := -llz4 -lzstd -lxxhash -lcrypto
SANITIZE := -std=c11 -g -O1 -Wall -Wextra -Werror -fno-omit-frame-pointer -pthread
FUZZ_INPUTS ?= 20000
HAVE_NATIVE_HEADERS = printf '\043include <lz4.h>\n\043include <zstd.h>\n\043include <xxhash.h>\n\043include <openssl/evp.h>\n' | \
	$(CC) -E -x c - >/dev/null 2>&1

# Rebuild the extension in place when its sources change (pip install -e builds it the first time).
$(VENV)/.native: $(NATIVE_DEPS) setup.py | $(VENV)/.base
	$(PY) setup.py -q build_ext --inplace
	touch $@

native: $(VENV)/.native

$(NATIVE_OUT)/%-asan: native/tests/%.c $(NATIVE_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SANITIZE) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $< \
	  $(NATIVE_SRC) $(NATIVE_LIBS)

$(NATIVE_OUT)/%-tsan: native/tests/%.c $(NATIVE_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SANITIZE) -fsanitize=thread -o $@ $< $(NATIVE_SRC) $(NATIVE_LIBS)

# The C tests under ASan+UBSan (and the pool under TSan), and the decoder fuzz harness for a
# bounded number of malformed records. Skipped, with a message, where the headers are missing.
test-native: native-deps
	@if $(HAVE_NATIVE_HEADERS); then \
	  $(MAKE) --no-print-directory $(NATIVE_OUT)/test_native-asan $(NATIVE_OUT)/fuzz_decode-asan \
	    $(NATIVE_OUT)/test_native-tsan && \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    $(NATIVE_OUT)/test_native-asan && \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    $(NATIVE_OUT)/fuzz_decode-asan $(FUZZ_INPUTS) && \
	  TSAN_OPTIONS=halt_on_error=1 $(NATIVE_OUT)/test_native-tsan; \
	elif [ "$$CI" = true ]; then \
	  echo "test-native: lz4.h/zstd.h/xxhash.h/openssl/evp.h not found, and CI=true needs the native tests" \
	    "(install liblz4-dev libzstd-dev libxxhash-dev libssl-dev as root, docs/native.md)" >&2; exit 1; \
	else echo "test-native: lz4.h/zstd.h/xxhash.h/openssl/evp.h not found; native tests skipped (docs/native.md)"; fi
