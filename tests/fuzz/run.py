"""Fuzz ckptguard's parsers and decoder; print the outcomes per target.

    .venv/bin/python tests/fuzz/run.py --inputs 100000            # atheris if installed
    .venv/bin/python tests/fuzz/run.py --inputs 100000 --engine mutate   # no atheris needed

Targets (tests/fuzz/fuzz_targets.py): MANIFEST.json (raw and re-signed bodies), index.parquet
(raw bytes and structured row edits), data-file header, record header, trailer, footer, a whole
data file read by the reader, a one-file checkpoint's tail and its TOC (differential: ckptguard
against tests/independent_reader.py), LATEST, the chunk decoder and record reader of both backends
(differential), and the object tree (differential: ckptguard's decoder against
tests/independent_reader.py, seeded with each strict rule of format.md section 6). Every outcome
must be ``ok``, ``skip`` or ``typed:<error>``; ``BUG:...`` and ``slow:...`` are findings: the
input is written to --crashes and the exit status is 1.

Engines: ``atheris`` (coverage-guided libFuzzer over the instrumented ckptguard modules; the
first byte of an input picks the target) and ``mutate`` (a seeded random mutator over the seeds
and the kept corpus: bit flips, byte sets, interesting integers, inserts, deletes, splices).
Both start from tests/corpus/<target>/ and the seeds derived from tests/corpus/checkpoint.
The address space is limited (--mem-mb above the start-up size) so that an allocation no file
could back fails loudly as a MemoryError, which counts as a finding.

``--make-checkpoint DIR`` (re)creates the context checkpoint (tests/corpus/checkpoint).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

HANG_S = 120
_counts: dict[str, Counter] = defaultdict(Counter)
_findings: list[tuple[str, str, bytes]] = []


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_memory(mb: int) -> None:
    if mb > 0:
        limit = _vm_bytes() + (mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _record(ft, target: str, data: bytes, crashes: str) -> None:  # noqa: ANN001
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang: stacks, and the run ends
    out = ft.run_one(target, data)
    faulthandler.cancel_dump_traceback_later()
    _counts[target][out.split(":", 1)[0] if not out.startswith("typed") else out] += 1
    if ft.is_finding(out):
        _findings.append((target, out, data))
        os.makedirs(os.path.join(crashes, target), exist_ok=True)
        name = hashlib.sha1(data).hexdigest()[:16]
        with open(os.path.join(crashes, target, name), "wb") as f:
            f.write(data)
        print(f"FINDING {target} {name}: {out}", flush=True)


def corpus_inputs(ft, target: str) -> list[bytes]:  # noqa: ANN001
    out = list(ft.seeds(target))
    d = os.path.join(ft.CORPUS, target)
    if os.path.isdir(d):
        for n in sorted(os.listdir(d)):
            with open(os.path.join(d, n), "rb") as f:
                out.append(f.read())
    return out


# ---------------------------------------------------------------------------- mutate engine

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 4096, 1 << 40]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(1 + int(rng.expovariate(0.7))):
        op = rng.randrange(8)
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 64)))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            w = rng.choice([1, 2, 4, 8])
            v = rng.choice(_INTERESTING) & ((1 << (8 * w)) - 1)
            b[i : i + w] = v.to_bytes(w, "little")
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 4:
            del b[i : i + rng.randrange(1, 64)]
        elif op == 5:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b[i:] = other[j : j + rng.randrange(1, 256)] + b[i:]
        elif op == 6:
            del b[i:]
        else:  # a run of one byte (zeroed page, long string)
            b[i : i + rng.randrange(1, 4096)] = bytes([rng.choice([0, 0x20, 0x5B, 0xFF])]) * (
                rng.randrange(1, 4096)
            )
    return bytes(b)


def run_mutate(ft, targets: list[str], n: int, seed: int, crashes: str) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    pools = {t: corpus_inputs(ft, t) for t in targets}
    done = 0
    for t in targets:  # every seed and corpus input once, as they are
        for data in pools[t]:
            _record(ft, t, data, crashes)
            done += 1
    while done < n:
        t = targets[done % len(targets)]
        pool = pools[t]
        _record(ft, t, mutate(rng, rng.choice(pool), pool), crashes)
        done += 1
        if done % 10000 == 0:
            print(f"  {done} inputs, {len(_findings)} findings", flush=True)


# ---------------------------------------------------------------------------- atheris engine


def run_atheris(
    ft,  # noqa: ANN001
    targets: list[str],
    n: int,
    seed: int,
    crashes: str,
    extra: list[str],
    keep: int,
) -> None:
    import atheris

    work = tempfile.mkdtemp(prefix="ckptguard-atheris-")
    seen = set()
    for k, t in enumerate(targets):
        for data in corpus_inputs(ft, t):
            name = hashlib.sha1(bytes([k]) + data).hexdigest()
            seen.add(name)
            with open(os.path.join(work, name), "wb") as f:
                f.write(bytes([k]) + data)
    state = {"n": 0, "t0": time.monotonic()}

    def one(data: bytes) -> None:
        if not data:
            return
        t = targets[data[0] % len(targets)]
        _record(ft, t, data[1:], crashes)
        state["n"] += 1
        if state["n"] % 10000 == 0:
            print(f"  {state['n']} inputs, {len(_findings)} findings", flush=True)
        if state["n"] == n:
            _report(time.monotonic() - state["t0"], "atheris")
            if keep:
                _keep_corpus(ft, targets, work, seen, keep)
            sys.stdout.flush()
            os._exit(1 if _findings else 0)

    args = [
        sys.argv[0],
        work,
        f"-runs={n + 10}",
        f"-seed={seed}",
        "-max_len=70000",
        "-timeout=30",
        "-print_final_stats=1",
        *extra,
    ]
    atheris.Setup(args, one)
    atheris.Fuzz()


def _keep_corpus(ft, targets: list[str], work: str, seen: set, per_target: int) -> None:  # noqa: ANN001
    """Copy the smallest new inputs libFuzzer kept for their coverage (at most ``per_target``
    of at most 4 KiB per target) into tests/corpus/<target>/, for the replay test."""
    found: dict[str, list[bytes]] = defaultdict(list)
    for name in os.listdir(work):
        if name in seen:
            continue
        with open(os.path.join(work, name), "rb") as f:
            data = f.read()
        if 1 < len(data) <= 4097:
            found[targets[data[0] % len(targets)]].append(data[1:])
    kept = 0
    for t, inputs in found.items():
        d = os.path.join(ft.CORPUS, t)
        os.makedirs(d, exist_ok=True)
        have = len([x for x in os.listdir(d) if x.startswith("cov-")])
        for data in sorted(inputs, key=len)[: max(0, per_target - have)]:
            with open(os.path.join(d, "cov-" + hashlib.sha1(data).hexdigest()[:12]), "wb") as f:
                f.write(data)
            kept += 1
    print(f"kept {kept} new inputs in {ft.CORPUS}")


# ---------------------------------------------------------------------------- main


def _report(elapsed: float, engine: str) -> None:
    total = sum(sum(c.values()) for c in _counts.values())
    print(f"\n{total} inputs in {elapsed:.1f} s ({engine}); outcomes per target:")
    sys.path.insert(0, HERE)
    import fuzz_targets as ft

    print(ft.summarize(_counts))
    print(f"findings: {len(_findings)}")
    for t, out, data in _findings[:20]:
        print(f"  {t}: {out} ({len(data)} bytes, {hashlib.sha1(data).hexdigest()[:16]})")


def make_checkpoint(path: str) -> None:
    import torch

    import ckptguard

    g = torch.Generator().manual_seed(2026)
    state = {
        "w": torch.randn(300, generator=g),  # raw (incompressible), two chunks
        "z": torch.zeros(300, dtype=torch.float64),  # shuffle-lz4, three chunks
        "h": (torch.randn(40, generator=g) * 0.02).to(torch.bfloat16),
        "meta": {"step": 3, "lr": 0.5, "tag": b"\x00\x01", "t": (1, 2)},
    }
    tmp = tempfile.mkdtemp()
    ckptguard.save(state, os.path.join(tmp, "checkpoint"), chunk_size=1024, step=3)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(os.path.join(tmp, "checkpoint"), path)
    shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    ap.add_argument("--targets", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mem-mb", type=int, default=4096, help="address space above start-up")
    ap.add_argument("--crashes", default=os.path.join(tempfile.gettempdir(), "ckptguard-fuzz"))
    ap.add_argument("--make-checkpoint", metavar="DIR")
    ap.add_argument(
        "--keep-corpus",
        type=int,
        default=0,
        metavar="N",
        help="atheris: keep up to N new small inputs per target in tests/corpus",
    )
    args, extra = ap.parse_known_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutate"
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["ckptguard"]):
            import fuzz_targets as ft

            import ckptguard.api  # noqa: F401
    else:
        import fuzz_targets as ft
    targets = [t for t in args.targets.split(",") if t] or list(ft.TARGETS)
    ft.context()
    _limit_memory(args.mem_mb)
    t0 = time.monotonic()
    if engine == "atheris":
        run_atheris(ft, targets, args.inputs, args.seed, args.crashes, extra, args.keep_corpus)
    run_mutate(ft, targets, args.inputs, args.seed, args.crashes)
    _report(time.monotonic() - t0, engine)
    return 1 if _findings else 0


if __name__ == "__main__":
    sys.exit(main())
