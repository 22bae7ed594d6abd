"""Delta encoding against a base checkpoint: does it pay for tensors that change a little?

Trains a small causal transformer LM on CPU (token streams from a sparse random Markov chain,
AdamW, linear warm-up then cosine decay, fixed seed), then fine-tunes it in full on a second
chain at a low LR with a fresh optimizer. State is captured at save points in three phases:
``early`` (high LR), ``late`` (end of the cosine, LR near its floor) and ``finetune``. For each
pair (base, next) ``interval`` steps apart, every tensor is cut into ckptguard's chunks
(``writer.DEFAULT_CHUNK``) and each chunk of ``next`` is stored

  plain  alone: ckptguard's shuffle-lz4, shuffle-zstd level 1 and 3 (the byte-plane shuffle is
         part of those codecs),
  xor    XORed with the base chunk's raw bytes, then the same codecs,
  sub    as the difference of the bit patterns (element-wide integers, new - base, zigzag-mapped
         so that small negative differences are small), then the same codecs.

State parts: ``weights`` (fp32 master weights), ``weights_bf16`` (a bf16 copy, as mixed-precision
training keeps), ``exp_avg`` and ``exp_avg_sq`` (AdamW moments, fp32). Stored bytes and encode
times come from ``encode.encode_buffer`` on the active backend with one thread: per chunk the
same codec and bytes as ``encode.encode`` (checked on each part's first chunk). Decode times:
``encode.decode`` per chunk; a delta's decode also decodes the base chunk (the extra read) and
undoes the XOR. Rule (issue 18): adopt only if a delta stores >= 20% fewer bytes than the best
plain codec, each delta against a full base (one extra base-chunk read per chunk, no chains).

    python benchmarks/delta_encoding.py [--quick] [--cache snaps.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ckptguard import backend, encode
from ckptguard.writer import DEFAULT_CHUNK

CODECS = {
    "lz4": (encode.SHUFFLE_LZ4, 0),
    "zstd1": (encode.SHUFFLE_ZSTD, 1),
    "zstd3": (encode.SHUFFLE_ZSTD, 3),
}
METHODS = ("plain", "xor", "sub")
PARTS = ("weights", "weights_bf16", "exp_avg", "exp_avg_sq")
UINT = {2: np.uint16, 4: np.uint32}
SINT = {2: np.int16, 4: np.int32}

FULL = {
    "vocab": 256, "dim": 384, "layers": 4, "seq": 64, "batch": 8,
    "pre_steps": 300, "warmup": 20, "peak_lr": 1e-3, "min_lr": 1e-4,
    "ft_steps": 100, "ft_warmup": 10, "ft_lr": 5e-5,
    # (phase, base step, next steps): pairs 10 and 50 steps apart
    "saves": {"early": (40, (50, 90)), "late": (250, (260, 300)), "finetune": (40, (50, 90))},
}  # fmt: skip
QUICK = {
    **FULL, "vocab": 512, "dim": 64, "layers": 2, "seq": 32, "batch": 4,
    "pre_steps": 60, "warmup": 5, "ft_steps": 30, "ft_warmup": 3,
    "saves": {"early": (10, (15, 20)), "late": (50, (55, 60)), "finetune": (10, (15, 20))},
}  # fmt: skip


# ---- the model and its trajectory ----------------------------------------------------------


class TinyLM(nn.Module):
    """A pre-norm causal transformer LM with a tied head."""

    def __init__(self, vocab: int, dim: int, layers: int, seq: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, max(1, dim // 64), 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.blocks(self.emb(x) + self.pos[: x.shape[1]], mask=mask, is_causal=True)
        return self.norm(h) @ self.emb.weight.T


class Chain:
    """Token streams from a sparse random Markov chain: 8 successors per token, Zipf weights."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.succ = torch.randint(0, vocab, (vocab, 8), generator=self.g)
        self.probs = 1.0 / torch.arange(1, 9, dtype=torch.float32)
        self.vocab = vocab

    def shifted(self, frac: float, seed: int) -> Chain:
        """Related data: this chain with the successors of a fraction ``frac`` of tokens redrawn."""
        other = Chain(self.vocab, seed)
        keep = torch.rand(self.vocab, generator=other.g) >= frac
        other.succ[keep] = self.succ[keep]
        return other

    def batch(self, batch: int, seq: int) -> torch.Tensor:
        tok = torch.randint(0, self.vocab, (batch,), generator=self.g)
        out = [tok]
        for _ in range(seq):
            pick = torch.multinomial(self.probs.expand(batch, 8), 1, generator=self.g)[:, 0]
            tok = self.succ[tok, pick]
            out.append(tok)
        return torch.stack(out, 1)


def lr_at(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, np.ndarray]]:
    """Copies of the state a checkpoint holds, per part and parameter name."""
    snap: dict[str, dict[str, np.ndarray]] = {p: {} for p in PARTS}
    for name, p in model.named_parameters():
        st = opt.state[p]
        snap["weights"][name] = p.detach().numpy().copy()
        snap["weights_bf16"][name] = p.detach().to(torch.bfloat16).view(torch.int16).numpy().copy()
        snap["exp_avg"][name] = st["exp_avg"].numpy().copy()
        snap["exp_avg_sq"][name] = st["exp_avg_sq"].numpy().copy()
    return snap


def _run(model: nn.Module, chain: Chain, cfg: dict, phase: str, steps: int, sched: Any) -> Iterator:
    """Train ``steps`` steps with a fresh AdamW; yield (step, snapshot) at the phase's saves."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.999), weight_decay=0.01)
    wanted = {p: {b, *n} for p, (b, n) in cfg["saves"].items()}
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = sched(step - 1)
        x = chain.batch(cfg["batch"], cfg["seq"])
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab"]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps:
            print(f"  {phase} step {step}: loss {loss.item():.3f} lr {sched(step - 1):.2e}")
        for ph, at in wanted.items():
            if (ph == "finetune") == (phase == "finetune") and step in at:
                yield ph, step, snapshot(model, opt)


def train(cfg: dict) -> dict[str, dict[int, dict]]:
    """Pre-train, then fully fine-tune on other data; the snapshots by phase and step."""
    torch.manual_seed(0)
    model = TinyLM(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["seq"])
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.2f} M parameters")
    snaps: dict[str, dict[int, dict]] = {p: {} for p in cfg["saves"]}

    def pre(s: int) -> float:
        return lr_at(s, cfg["warmup"], cfg["pre_steps"], cfg["peak_lr"], cfg["min_lr"])

    def ft(s: int) -> float:
        return lr_at(s, cfg["ft_warmup"], cfg["ft_steps"], cfg["ft_lr"], 0.0)

    chain = Chain(cfg["vocab"], 1)
    for ph, step, snap in _run(model, chain, cfg, "pretrain", cfg["pre_steps"], pre):
        snaps[ph][step] = snap
    for ph, step, snap in _run(model, chain.shifted(0.25, 2), cfg, "finetune", cfg["ft_steps"], ft):
        snaps[ph][step] = snap
    return snaps


# ---- the encodings -------------------------------------------------------------------------


def delta(new: np.ndarray, base: np.ndarray, method: str) -> np.ndarray:
    """The bytes a delta stores: XOR of the bit patterns, or their zigzag-mapped difference."""
    u = UINT[new.itemsize]
    a, b = new.view(u).ravel(), base.view(u).ravel()
    if method == "xor":
        return np.bitwise_xor(a, b)
    bits = 8 * new.itemsize
    d = (a - b).view(SINT[new.itemsize])  # wraps: the difference modulo 2**bits
    return ((d << 1) ^ (d >> (bits - 1))).view(u)


def undelta(stored: np.ndarray, base: np.ndarray, method: str) -> np.ndarray:
    """Inverse of ``delta``: the new bit patterns from the stored ones and the base."""
    u = UINT[base.itemsize]
    b = base.view(u).ravel()
    if method == "xor":
        return np.bitwise_xor(stored, b)
    z = stored.view(u)
    d = (z >> 1) ^ (-(z & 1).view(SINT[base.itemsize])).view(u)
    return b + d


def _encode(buf: np.ndarray, elem: int, codec: str) -> tuple[int, float, list]:
    cid, level = CODECS[codec]
    t0 = time.perf_counter()
    recs = encode.encode_buffer(buf, elem, DEFAULT_CHUNK, cid, threads=1, level=level)
    return sum(len(r[1]) for r in recs), time.perf_counter() - t0, recs


def _decode_s(recs: list, raw_len: int, elem: int) -> float:
    t0 = time.perf_counter()
    for i, (cid, payload, _h) in enumerate(recs):
        n = min(DEFAULT_CHUNK, raw_len - i * DEFAULT_CHUNK)
        encode.decode(cid, payload, n, elem)
    return time.perf_counter() - t0


def _check_same_codec(buf: np.ndarray, elem: int, codec: str, rec: tuple) -> None:
    """The buffer call stores what ``encode.encode`` stores for the first chunk (zstd sizes may
    differ by a few bytes where the native core and python-zstandard link other libzstd)."""
    ref = encode.encode(buf.view(np.uint8)[:DEFAULT_CHUNK].tobytes(), elem, *CODECS[codec])
    if ref[0] != rec[0] or abs(len(ref[1]) - len(rec[1])) > len(rec[1]) // 100:
        raise AssertionError(f"encode_buffer and encode disagree on {codec}")


def measure_part(base: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> dict[str, Any]:
    """Stored bytes and seconds of every method and codec over one state part's tensors."""
    out: dict[str, Any] = {"raw": 0}
    for m in (*METHODS, "base"):
        for c in CODECS:
            out[f"{m}/{c}"] = {"bytes": 0, "enc_s": 0.0, "dec_s": 0.0}
    checked = False
    for name, arr in new.items():
        elem, raw_len = arr.itemsize, arr.nbytes
        out["raw"] += raw_len
        base_recs: dict[str, list] = {}
        for m in METHODS:
            t0 = time.perf_counter()
            buf = arr.ravel() if m == "plain" else delta(arr, base[name], m)
            prep = time.perf_counter() - t0
            for c in CODECS:
                n, dt, recs = _encode(buf, elem, c)
                r = out[f"{m}/{c}"]
                r["bytes"] += n
                r["enc_s"] += dt + prep
                r["dec_s"] += _decode_s(recs, raw_len, elem)
                if m == "plain":  # the base as a full checkpoint stores it
                    bn, bt, base_recs[c] = _encode(base[name].ravel(), elem, c)
                    out[f"base/{c}"]["bytes"] += bn
                    out[f"base/{c}"]["enc_s"] += bt
                else:  # the extra read: decode the base chunk, then undo the delta
                    r["dec_s"] += _decode_s(base_recs[c], raw_len, elem)
                    t0 = time.perf_counter()
                    got = undelta(buf, base[name], m)
                    r["dec_s"] += time.perf_counter() - t0
                    if not np.array_equal(got, arr.view(UINT[elem]).ravel()):
                        raise AssertionError(f"{m} round trip differs for {name}")
                if not checked:
                    _check_same_codec(buf, elem, c, recs[0])
        checked = True
    return out


# ---- the report ----------------------------------------------------------------------------


def _best(row: dict, method: str) -> tuple[str, int]:
    c = min(CODECS, key=lambda k: row[f"{method}/{k}"]["bytes"])
    return c, row[f"{method}/{c}"]["bytes"]


def summarize(rows: list[dict]) -> list[dict]:
    """Per row: best plain, best delta, their ratio, and the verdict under the 20% rule."""
    for row in rows:
        pc, pb = _best(row, "plain")
        dm = min(("xor", "sub"), key=lambda m: _best(row, m)[1])
        dc, db = _best(row, dm)
        row["best_plain"], row["best_delta"] = f"plain/{pc}", f"{dm}/{dc}"
        row["ratio"] = db / pb
        row["xor_ratio"] = _best(row, "xor")[1] / pb
        row["sub_ratio"] = _best(row, "sub")[1] / pb
        # a load of the delta reads the base's record too (stored with the best plain codec)
        row["load_read"] = (row[f"base/{pc}"]["bytes"] + db) / pb
        row["pays"] = row["ratio"] <= 0.8
    return rows


def _mbs(nbytes: int, s: float) -> str:
    return f"{nbytes / s / 1e6:.0f}" if s > 0 else "-"


def markdown(rows: list[dict]) -> str:
    """The table docs/benchmarks.md carries: MB stored per method, ratio, speeds (zstd1)."""
    head = (
        "| phase | interval | part | raw MB | lz4 plain / xor | zstd1 plain / xor | "
        "zstd3 plain / xor / sub | xor / plain | sub / plain | load reads / plain | "
        "zstd1 enc MB/s plain / xor | zstd1 dec MB/s plain / xor+base |\n|" + "---|" * 12
    )
    lines = [head]
    for r in rows:
        mb = {k: v["bytes"] / 1e6 for k, v in r.items() if isinstance(v, dict)}
        raw = r["raw"]
        lines.append(
            f"| {r['phase']} | {r['interval']} | {r['part']} | {raw / 1e6:.1f} "
            f"| {mb['plain/lz4']:.1f} / {mb['xor/lz4']:.1f} "
            f"| {mb['plain/zstd1']:.1f} / {mb['xor/zstd1']:.1f} "
            f"| {mb['plain/zstd3']:.1f} / {mb['xor/zstd3']:.1f} / {mb['sub/zstd3']:.1f} "
            f"| **{r['xor_ratio']:.2f}** | {r['sub_ratio']:.2f} | {r['load_read']:.2f} "
            f"| {_mbs(raw, r['plain/zstd1']['enc_s'])} / {_mbs(raw, r['xor/zstd1']['enc_s'])} "
            f"| {_mbs(raw, r['plain/zstd1']['dec_s'])} / {_mbs(raw, r['xor/zstd1']['dec_s'])} |"
        )
    return "\n".join(lines)


def totals(rows: list[dict]) -> list[dict]:
    """All parts of a pair together: what a whole checkpoint would store."""
    out = []
    for key in dict.fromkeys((r["phase"], r["interval"]) for r in rows):
        sel = [r for r in rows if (r["phase"], r["interval"]) == key]
        tot: dict[str, Any] = {"phase": key[0], "interval": key[1], "part": "all", "raw": 0}
        for r in sel:
            tot["raw"] += r["raw"]
            for k, v in r.items():
                if isinstance(v, dict):
                    t = tot.setdefault(k, {"bytes": 0, "enc_s": 0.0, "dec_s": 0.0})
                    for f in t:
                        t[f] += v[f]
        out.append(tot)
    return summarize(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, a few steps (smoke run)")
    ap.add_argument("--cache", help="snapshots file: loaded if present, else written")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    if args.cache and os.path.exists(args.cache):
        snaps = torch.load(args.cache, weights_only=False)
    else:
        t0 = time.perf_counter()
        snaps = train(cfg)
        print(f"trained in {time.perf_counter() - t0:.0f} s")
        if args.cache:
            torch.save(snaps, args.cache)
    print(f"backend {backend.resolve(None)}, chunk {DEFAULT_CHUNK} B, one thread")
    rows = []
    for phase, (b, nexts) in cfg["saves"].items():
        for n in nexts:
            for part in PARTS:
                row = measure_part(snaps[phase][b][part], snaps[phase][n][part])
                rows.append({"phase": phase, "interval": n - b, "part": part, **row})
    rows = summarize(rows) + totals(rows)
    print(markdown(rows))
    for r in rows:
        if r["pays"]:
            print(f"pays: {r['phase']} +{r['interval']} {r['part']} ratio {r['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: str(v) for k, v in cfg.items()}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
