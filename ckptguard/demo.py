"""``make demo``: train a small transformer, checkpoint it, catch corruption, resume bitwise.

Everything here uses ckptguard's public API the way a training script would; the one exception is
reading ``index.parquet`` with pyarrow to find a payload byte to corrupt, as a curious user might.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

import ckptguard

from .format import index
from .format.layout import INDEX
from .fsutil import read_regular
from .units import format_size

VOCAB, D_MODEL, LAYERS, BATCH, SEED = 1000, 128, 3, 8, 1234


class TinyLM(nn.Module):
    """Embedding, a few transformer encoder layers, and a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, nhead=4, dim_feedforward=2 * D_MODEL, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _make(seed: int) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def _train_step(model: TinyLM, opt: torch.optim.Optimizer) -> torch.Tensor:
    """One AdamW step on a synthetic sequence task; draws from all three RNGs."""
    seq = random.choice([32, 48, 64])  # python RNG
    start = np.random.randint(0, VOCAB, size=(BATCH, 1))  # numpy RNG
    tokens = torch.from_numpy((start + 7 * np.arange(seq + 1)) % VOCAB)
    logits = model(tokens[:, :-1])  # dropout: torch RNG
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def _equal(a: Any, b: Any) -> tuple[bool, int]:
    """Deep equality (bitwise for tensors and arrays); also counts the tensors compared."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return ok, 1
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), 1
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return False, 0
        pairs = [_equal(a[k], b[k]) for k in a]
    elif isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return False, 0
        pairs = [_equal(x, y) for x, y in zip(a, b, strict=True)]
    else:
        return a == b and type(a) is type(b), 0
    return all(ok for ok, _ in pairs), sum(n for _, n in pairs)


def _flip_payload_byte(ckpt: str, prefer: str) -> str:
    """Flip one byte in the middle of a chunk payload of ``ckpt``; return the tensor's key."""
    rows = index.read_table(read_regular(os.path.join(ckpt, INDEX))).to_pylist()
    row = next((r for r in rows if r["key"] == prefer), max(rows, key=lambda r: r["stored_len"]))
    pos = row["offset"] + 64 + row["stored_len"] // 2  # 64: the chunk record header
    with open(os.path.join(ckpt, row["file"]), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x40]))
    return row["key"]


def _command() -> str:
    """How to call the ckptguard command from here: on PATH, else the script next to python."""
    if shutil.which("ckptguard"):
        return "ckptguard"
    exe = os.path.join(os.path.dirname(sys.executable), "ckptguard")
    if not os.path.exists(exe):
        return "ckptguard"
    rel = os.path.relpath(exe)
    return rel if not rel.startswith("..") and rel != exe else exe


class _Story:
    """Prints numbered steps and records whether every check passed."""

    def __init__(self, console: Console) -> None:
        self.con, self.ok, self.n = console, True, 0

    def step(self, title: str) -> None:
        self.n += 1
        self.con.print(f"\n[bold cyan]{self.n}. {title}[/]")

    def say(self, text: str, style: str = "") -> None:
        self.con.print(f"   {escape(text)}", style=style, highlight=False, soft_wrap=True)

    def check(self, passed: bool, text: str) -> None:
        self.ok &= passed
        mark = "[green]✓[/]" if passed else "[bold red]✗[/]"
        self.con.print(f"   {mark} {escape(text)}", highlight=False, soft_wrap=True)


def run_demo(store: str, *, steps: int = 20) -> int:
    """Run the demo against ``store``; return 0 if every check passed, else 1."""
    t0 = time.perf_counter()
    s = _Story(Console())
    s.con.print(
        f"[bold]ckptguard {ckptguard.__version__} demo[/]: store {escape(os.path.abspath(store))}",
        highlight=False,
    )

    s.step(f"Train a {LAYERS}-layer transformer (d_model {D_MODEL}, vocab {VOCAB}) with AdamW")
    random.seed(SEED)
    np.random.seed(SEED)
    model, opt = _make(SEED)
    n_params = sum(p.numel() for p in model.parameters())
    losses = [_train_step(model, opt).item() for _ in range(steps)]
    s.say(
        f"{n_params:,} parameters, {steps} steps on CPU: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )

    s.step("Save model + optimizer + RNG states + step with ckptguard.save")
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "rng": _rng_state(),
        "step": steps,
    }
    path = os.path.join(store, f"step-{steps}")
    t = time.perf_counter()
    info = ckptguard.save(
        state,
        path,
        overwrite=True,
        step=steps,
        metadata={"model": "TinyLM", "d_model": D_MODEL, "layers": LAYERS, "loss": losses[-1]},
    )
    save_s = time.perf_counter() - t
    s.say(
        f"{info.path}: {info.tensors} tensors in {info.chunks} chunks, "
        f"{format_size(info.stored_bytes)} stored / {format_size(info.raw_bytes)} raw, "
        f"{save_s:.2f} s"
    )

    s.step("List the store")
    st = ckptguard.Store(store)
    latest = st.latest()
    table = Table(box=None, padding=(0, 2))
    for col in ("name", "step", "stored", "created", ""):
        table.add_column(col)
    for ci in st.list():
        mark = "LATEST" if latest and ci.name == latest.name else ""
        table.add_row(
            ci.name,
            str(ci.step),
            format_size(ci.stored_bytes),
            ci.created.strftime("%Y-%m-%d %H:%M:%S"),
            mark,
        )
    s.con.print(table)
    s.check(latest is not None and latest.name == info.name, f"LATEST names {info.name}")

    s.step("Verify every chunk against its xxh3-128 hash")
    report = ckptguard.verify(path)
    checked = format_size(report.bytes_checked)
    s.check(report.ok, f"{report.chunks_checked} chunks, {checked} checked")

    with tempfile.TemporaryDirectory(prefix="ckptguard-demo-") as scratch:
        s.step("Flip one byte of a tensor payload in a copy")
        bad = os.path.join(scratch, info.name)
        shutil.copytree(path, bad)
        key = _flip_payload_byte(bad, prefer="model/encoder.layers.1.linear1.weight")
        s.say(f"copied to {bad}, flipped a byte inside tensor {key}")
        bad_report = ckptguard.verify(bad)
        named = [p for p in bad_report.problems if p.key == key]
        s.check(not bad_report.ok and bool(named), "verify catches it:")
        for p in bad_report.problems[:3]:
            s.say(f"  {p}", style="yellow")
        try:
            ckptguard.load(bad)
            s.check(False, "load of the corrupted copy raised nothing")
        except ckptguard.CorruptCheckpointError as exc:
            where = f"tensor {exc.key}, chunk {exc.chunk}, file {exc.file} @ {exc.offset}"
            s.check(exc.key == key, f"load refuses it: CorruptCheckpointError ({where})")

    s.step("Restore into a freshly built model and optimizer")
    t = time.perf_counter()
    loaded = ckptguard.load(path)
    load_s = time.perf_counter() - t
    same, n_tensors = _equal(state, loaded)
    s.check(same, f"all {n_tensors} tensors and every plain value equal bitwise ({load_s:.2f} s)")
    # Continue the original run by one step, then do the same from the restored state.
    loss_a = _train_step(model, opt)
    model2, opt2 = _make(SEED + 1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optim"])
    _set_rng_state(loaded["rng"])
    loss_b = _train_step(model2, opt2)
    s.check(
        torch.equal(loss_a, loss_b),
        f"one more step: loss {loss_a.item():.6f} (original) vs {loss_b.item():.6f} (restored)"
        f", bitwise {'equal' if torch.equal(loss_a, loss_b) else 'DIFFERENT'}",
    )
    params_same, _ = _equal(model.state_dict(), model2.state_dict())
    s.check(params_same, "parameters after that step are identical too")

    s.step("Summary")
    s.say(f"checkpoint {info.path}")
    s.say(
        f"{format_size(info.stored_bytes)} stored for {format_size(info.raw_bytes)} raw "
        f"({info.raw_bytes / max(info.stored_bytes, 1):.2f}x), save {save_s:.2f} s, "
        f"load {load_s:.2f} s, whole demo {time.perf_counter() - t0:.1f} s"
    )
    if s.ok:
        s.con.print("\n[bold green]All checks passed.[/] Next, try:")
    else:
        s.con.print("\n[bold red]Some checks FAILED[/] (see ✗ above). Next, try:")
    exe = _command()
    for cmd in (f"{exe} ls {store}", f"{exe} info {path}", f"{exe} verify {store}", "make test"):
        s.say(cmd, style="bold")
    return 0 if s.ok else 1
