"""Native vs pure-Python chunk codec, measured on the same data in one run (docs/benchmarks.md).

Model-like buffers (normal(0, 0.02) values as bf16 and fp32), 4 MiB chunks:
  encode   hash + byte-plane shuffle + LZ4 of a whole buffer (encode.encode_buffer), per backend
           and thread count; the Python path runs its chunks on a thread pool
  hash     xxh3-128 of the whole buffer (native, python-xxhash) against memcpy of it
  decode   decode_into a preallocated destination, with hash verification
  save     durable time of ckptguard.save (native, python) against torch.distributed.checkpoint
           (dcp.save, every file and the directory fsynced) and torch.save + fsync
  codecs   stored fraction and encode GB/s per core of shuffle-lz4 and shuffle-zstd at levels
           -1..3 on the bench's "model" (bf16 weights + fp32 AdamW moments) and "weights"
           workloads (ckptguard.bench.workloads), native path, one thread, median of the rounds

Every configuration runs once per round, rounds interleave the configurations, and the best
round is reported (other processes on a shared machine only ever slow a round down).

    python benchmarks/codec_bench.py --size 256MiB --threads 1,2 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lz4.block
import numpy as np
import torch
import xxhash

import ckptguard
from ckptguard import backend, encode
from ckptguard.bench.workloads import iter_tensors, make_workload

CHUNK = 4 << 20
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


def parse_size(text: str) -> int:
    for unit, mult in UNITS.items():
        if unit and text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def model_like(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Weights as a trained model has them: normal(0, 0.02), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n = nbytes // torch.finfo(dtype).bits * 8
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


class Rounds:
    """Collect per-configuration timings over interleaved rounds; keep the best."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def run(self, key: str, fn: Callable[[], Any], **meta: Any) -> Any:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self.best[key] = min(dt, self.best.get(key, float("inf")))
        self.meta.setdefault(key, meta)
        return out


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_state(total: int) -> dict[str, torch.Tensor]:
    """A model-like state: bf16 weight matrices of a few sizes adding up to ``total`` bytes."""
    state, left, i = {}, total, 0
    sizes = [64 << 20, 16 << 20, 4 << 20, 1 << 20]
    while left > 0:
        n = min(sizes[i % len(sizes)], left)
        state[f"layers.{i}.weight"] = model_like(n, torch.bfloat16, 100 + i)
        left -= n
        i += 1
    return state


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    threads = [int(t) for t in args.threads.split(",")]
    have_native = backend.available()
    backends = ["python"] + (["native"] if have_native else [])
    data = {
        "bf16": (_raw(model_like(size, torch.bfloat16, 1)), 2),
        "fp32": (_raw(model_like(size, torch.float32, 2)), 4),
    }
    copy_dest = np.ones(size, np.uint8)
    dests = {k: np.ones(len(v[0]), np.uint8) for k, v in data.items()}
    encoded = {
        k: encode.encode_buffer(buf, elem, CHUNK, True, max(threads), "python")
        for k, (buf, elem) in data.items()
    }
    stored = {k: sum(len(p) for _, p, _ in v) / len(data[k][0]) for k, v in encoded.items()}
    if have_native:  # the two paths must agree before their speed means anything
        for k, (buf, elem) in data.items():
            assert encode.encode_buffer(buf, elem, CHUNK, True, 2, "native") == encoded[k]
    items = {
        k: [
            encode.DecodeItem(
                c, p, min(CHUNK, len(data[k][0]) - i * CHUNK), data[k][1], h, i * CHUNK
            )
            for i, (c, p, h) in enumerate(v)
        ]
        for k, v in encoded.items()
    }
    shuffled = {
        k: [encode.shuffle(buf[i : i + CHUNK], elem) for i in range(0, len(buf), CHUNK)]
        for k, (buf, elem) in data.items()
    }
    r = Rounds()
    save_dir = tempfile.mkdtemp(prefix="codec-bench-", dir=args.dir)
    state = save_state(parse_size(args.save_size)) if args.save_size != "0" else {}
    save_bytes = sum(t.numel() * t.element_size() for t in state.values())
    try:
        for rnd in range(args.rounds):
            for k, (buf, elem) in data.items():
                n = len(buf)
                r.run(f"memcpy/{k}", lambda b=buf: np.copyto(copy_dest[: len(b)], b), bytes=n)
                r.run(f"hash/python/{k}", lambda b=buf: xxhash.xxh3_128_digest(b), bytes=n)
                if have_native:
                    r.run(f"hash/native/{k}", lambda b=buf: backend.native().hash128(b), bytes=n)
                r.run(  # the floor of both paths: the LZ4 call alone, on pre-shuffled chunks
                    f"lz4only/{k}",
                    lambda k=k: [lz4.block.compress(c, store_size=False) for c in shuffled[k]],
                    bytes=n,
                )
                for be in backends:
                    for t in threads:
                        r.run(
                            f"encode/{be}/{t}/{k}",
                            lambda b=buf, e=elem, t=t, be=be: encode.encode_buffer(
                                b, e, CHUNK, True, t, be
                            ),
                            bytes=n,
                        )
                        r.run(
                            f"decode/{be}/{t}/{k}",
                            lambda k=k, t=t, be=be: encode.decode_into(dests[k], items[k], t, be),
                            bytes=n,
                        )
            if state:
                for engine in [f"ckptguard-{be}" for be in backends] + ["dcp", "torch.save"]:
                    d = os.path.join(save_dir, f"{engine}-{rnd}")
                    r.run(
                        f"save/{engine}", lambda e=engine, d=d: _save(e, state, d), bytes=save_bytes
                    )
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus_usable": backend.cpu_count(),
            "load_avg": os.getloadavg(),
            "backend": backend.reason(),
            "libraries": backend.info().get("libraries"),
            "python_lz4": backend.info().get("python_lz4"),
        },
        "size": size,
        "save_bytes": save_bytes,
        "chunk": CHUNK,
        "rounds": args.rounds,
        "stored_ratio": stored,
        "seconds": r.best,
        "gbps": {k: r.meta[k]["bytes"] / v / 1e9 for k, v in r.best.items()},
    }


CODEC_CONFIGS = ["lz4", "zstd:-1", "zstd:1", "zstd:2", "zstd:3"]


def codec_ratios(size: int, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """{workload: {config: {"fraction", "gbps_core"}}}: every tensor of the workload encoded in
    4 MiB chunks on one thread; configurations interleaved in each round, median time."""
    be = "native" if backend.available() else "python"
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("model", "weights"):
        bufs = [
            (encode.as_buffer(t), t.element_size())
            for t in iter_tensors(make_workload(name, size).state)
        ]
        raw = sum(len(b) for b, _ in bufs)
        times: dict[str, list[float]] = {c: [] for c in CODEC_CONFIGS}
        stored: dict[str, int] = {}
        for _ in range(rounds):
            for cfg in CODEC_CONFIGS:
                codec, level = encode.parse_compress(cfg, {"lz4": 1, "zstd": encode.SHUFFLE_ZSTD})
                t0 = time.perf_counter()
                recs = [
                    encode.encode_buffer(b, e, CHUNK, codec, 1, be, level=level) for b, e in bufs
                ]
                times[cfg].append(time.perf_counter() - t0)
                stored[cfg] = sum(len(p) for rs in recs for _, p, _ in rs)
        out[name] = {
            c: {"fraction": stored[c] / raw, "gbps_core": raw / float(np.median(times[c])) / 1e9}
            for c in CODEC_CONFIGS
        }
    return out


def codec_table(res: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'codec':<10}" + "".join(f"{w + ' frac':>14}{w + ' GB/s/core':>18}" for w in res)]
    for c in CODEC_CONFIGS:
        cells = "".join(
            f"{res[w][c]['fraction']:>14.3f}{res[w][c]['gbps_core']:>18.2f}" for w in res
        )
        lines.append(f"{c:<10}{cells}")
    return "\n".join(lines)


def _save(engine: str, state: dict, d: str) -> None:
    if engine.startswith("ckptguard-"):
        with backend.use(engine.split("-", 1)[1]):
            ckptguard.save(state, os.path.join(d, "ckpt"))
        return
    os.makedirs(d)
    if engine == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=os.path.join(d, "ckpt"))
    else:
        torch.save(state, os.path.join(d, "state.pt"))
    fsync_tree(d)


def table(res: dict[str, Any], threads: list[int]) -> str:
    g, out = res["gbps"], []
    out.append(f"size {res['size'] >> 20} MiB per buffer, chunk 4 MiB, best of {res['rounds']}")
    out.append(f"{'measure':<34}{'bf16 GB/s':>12}{'fp32 GB/s':>12}")

    def row(label: str, key: str) -> None:
        vals = [g.get(key.format(k=k)) for k in ("bf16", "fp32")]
        if any(v is not None for v in vals):
            out.append(f"{label:<34}" + "".join(f"{v:>12.2f}" if v else f"{'-':>12}" for v in vals))

    row("memcpy", "memcpy/{k}")
    row("hash xxh3-128 native", "hash/native/{k}")
    row("hash xxh3-128 python-xxhash", "hash/python/{k}")
    row("LZ4 alone (python-lz4, 1 thread)", "lz4only/{k}")
    for op in ("encode", "decode"):
        for be in ("python", "native"):
            for t in threads:
                row(f"{op} {be} {t} thread(s)", f"{op}/{be}/{t}/{{k}}")
    for k in ("bf16", "fp32"):
        for t in threads:
            n, p = g.get(f"encode/native/{t}/{k}"), g.get(f"encode/python/{t}/{k}")
            if n and p:
                out.append(f"encode native/python {k} at {t} thread(s): {n / p:.2f}x")
        if g.get(f"hash/native/{k}"):
            out.append(f"hash native/memcpy {k}: {g[f'hash/native/{k}'] / g[f'memcpy/{k}']:.2f}x")
    sr = res["stored_ratio"]
    out.append(f"stored/raw: bf16 {sr['bf16']:.3f}, fp32 {sr['fp32']:.3f}")
    s = res["seconds"]
    if "save/dcp" in s:
        out.append(
            f"durable save of {res['save_bytes'] >> 20} MiB bf16 (seconds, and vs dcp.save):"
        )
        for e in ("ckptguard-native", "ckptguard-python", "dcp", "torch.save"):
            if f"save/{e}" in s:
                out.append(
                    f"  {e:<20}{s[f'save/{e}']:>8.3f} s  {s[f'save/{e}'] / s['save/dcp']:.2f}x"
                )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="256MiB", help="bytes per buffer (bf16 and fp32 each)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--save-size", default="512MiB", help="model-like state for the save (0: skip)")
    p.add_argument("--dir", default=None, help="where the saves go (default: the temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--codecs", default="256MiB", help="workload size for the codec table (0: skip)")
    p.add_argument("--only-codecs", action="store_true", help="the codec table alone")
    args = p.parse_args()
    res: dict[str, Any] = {} if args.only_codecs else bench(args)
    if res:
        print(table(res, [int(t) for t in args.threads.split(",")]))
    if parse_size(args.codecs):
        res["codecs"] = codec_ratios(parse_size(args.codecs), args.rounds)
        print(codec_table(res["codecs"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
