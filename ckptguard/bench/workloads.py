"""Deterministic, realistic states to checkpoint, scaled by a byte size.

- ``model``: a transformer-like model's bf16 weights (linear std 0.02, norms near 1, small biases)
  and the fp32 AdamW state a few steps in (exp_avg small normal, exp_avg_sq tiny positive, step).
- ``finetune``: frozen bf16 base weights (95% of the bytes) plus LoRA adapters and their AdamW
  state; ``advance`` changes only the adapters and their state (a training step between two saves).
- ``small``: 10,000 fp32 tensors of 4 KiB (per-tensor overhead).
- ``weights``: bf16 weights only (the GPU workload: "N GiB of bf16 state").

Values come from seeded torch generators on the target device, one per tensor, so they do not
depend on generation order; they are not uniform random bytes, so compression sees realistic data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import WORKLOADS

SMALL_COUNT = 10_000
SMALL_BYTES = 4096
FROZEN_FRACTION = 0.95


@dataclass
class Workload:
    """A state to save, and how to change it between the two saves of a two-save workload."""

    name: str
    description: str
    state: dict[str, Any]
    advance: Callable[[dict[str, Any]], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def logical_bytes(self) -> int:
        """Bytes of tensor data in the state (what every engine must store)."""
        return sum(t.numel() * t.element_size() for t in iter_tensors(self.state))

    @property
    def tensor_count(self) -> int:
        """Number of tensors in the state."""
        return sum(1 for _ in iter_tensors(self.state))


def iter_tensors(obj: Any) -> Any:
    """Every tensor in a nested dict/list state, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


class _Gen:
    """Seeded normal tensors on one device; the seed of each tensor derives from its name."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        self.gen = torch.Generator(device=device)

    def normal(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, mean: float, std: float
    ) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=8).digest()
        self.gen.manual_seed(int.from_bytes(digest, "little") >> 1)  # CPU uses the low 32 bits
        t = torch.empty(shape, dtype=dtype, device=self.device)
        return t.normal_(mean, std, generator=self.gen)


def _model_shapes(n_params: int) -> tuple[int, list[tuple[str, tuple[int, ...], str]]]:
    """Layer shapes of a transformer with about ``n_params`` parameters: (hidden, [(name, shape,
    kind)]), kind one of linear, bias, norm_w, norm_b, embed."""
    d = 64
    for cand in (128, 256, 512, 1024, 2048, 4096, 8192):
        if 12 * cand * cand * 4 <= n_params:
            d = cand
    per_layer = 12 * d * d + 13 * d
    layers = max(1, int(n_params * 0.85) // per_layer)
    shapes: list[tuple[str, tuple[int, ...], str]] = []
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "ln1.weight", (d,), "norm_w"),
            (p + "ln1.bias", (d,), "norm_b"),
            (p + "attn.qkv.weight", (3 * d, d), "linear"),
            (p + "attn.qkv.bias", (3 * d,), "bias"),
            (p + "attn.proj.weight", (d, d), "linear"),
            (p + "attn.proj.bias", (d,), "bias"),
            (p + "ln2.weight", (d,), "norm_w"),
            (p + "ln2.bias", (d,), "norm_b"),
            (p + "mlp.fc1.weight", (4 * d, d), "linear"),
            (p + "mlp.fc1.bias", (4 * d,), "bias"),
            (p + "mlp.fc2.weight", (d, 4 * d), "linear"),
            (p + "mlp.fc2.bias", (d,), "bias"),
        ]
    rows = max(1, (n_params - layers * per_layer - d) // d)
    shapes = [("embed.weight", (rows, d), "embed"), *shapes, ("norm.weight", (d,), "norm_w")]
    return d, shapes


_INIT = {  # kind -> (mean, std) of bf16 weights as training leaves them
    "linear": (0.0, 0.02),
    "embed": (0.0, 0.02),
    "bias": (0.0, 0.002),
    "norm_w": (1.0, 0.02),
    "norm_b": (0.0, 0.002),
}


def _weights(g: _Gen, shapes: list[tuple[str, tuple[int, ...], str]], prefix: str) -> dict:
    return {
        prefix + name: g.normal(prefix + name, shape, torch.bfloat16, *_INIT[kind])
        for name, shape, kind in shapes
    }


def _adam_state(g: _Gen, params: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """AdamW state a few steps in: exp_avg ~ N(0, 1e-4), exp_avg_sq ~ 0.01 * N(0, 1e-3)^2."""
    state = {}
    for name, p in params.items():
        sq = g.normal(name + ".exp_avg_sq", tuple(p.shape), torch.float32, 0.0, 1e-3)
        state[name] = {
            "step": torch.tensor(float(step), device=g.device),
            "exp_avg": g.normal(name + ".exp_avg", tuple(p.shape), torch.float32, 0.0, 1e-4),
            "exp_avg_sq": sq.square_().mul_(0.01),
        }
    groups = [
        {
            "lr": 3e-4,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.01,
            "amsgrad": False,
            "params": list(params),
        }
    ]
    return {"state": state, "param_groups": groups}


def _model(size: int, g: _Gen, prefix: str) -> Workload:
    d, shapes = _model_shapes(max(1, size // 10))  # 2 bytes bf16 + 4 + 4 fp32 moments
    params = _weights(g, shapes, prefix)
    state = {"model": params, "optim": _adam_state(g, params, step=10), "step": 10}
    desc = f"bf16 weights + fp32 AdamW moments, hidden {d}, {len(params)} parameters"
    return Workload("model", desc, state, info={"hidden": d})


def _weights_only(size: int, g: _Gen, prefix: str) -> Workload:
    d, shapes = _model_shapes(max(1, size // 2))
    params = _weights(g, shapes, prefix)
    desc = f"bf16 weights only, hidden {d}, {len(params)} tensors"
    return Workload("weights", desc, {"model": params, "step": 10}, info={"hidden": d})


def _finetune(size: int, g: _Gen, prefix: str) -> Workload:
    frozen_bytes = int(size * FROZEN_FRACTION)
    d, shapes = _model_shapes(max(1, frozen_bytes // 2))
    base = _weights(g, shapes, prefix)
    linears = [(n, s) for n, s, k in shapes if k == "linear"]
    per_rank_unit = sum(s[0] + s[1] for _n, s in linears)  # params of rank-1 adapters
    trainable_params = max(1, (size - frozen_bytes) // 10)  # 2 bytes bf16 + 8 bytes moments
    r = max(1, round(trainable_params / per_rank_unit))
    adapters: dict[str, torch.Tensor] = {}
    for n, (out_f, in_f) in linears:
        stem = prefix + n.removesuffix(".weight")
        adapters[stem + ".lora_A"] = g.normal(stem + ".lora_A", (r, in_f), torch.bfloat16, 0, 0.02)
        adapters[stem + ".lora_B"] = g.normal(stem + ".lora_B", (out_f, r), torch.bfloat16, 0, 1e-3)
    state = {
        "model": base,
        "adapters": adapters,
        "optim": _adam_state(g, adapters, step=100),
        "step": 100,
    }
    counter = [0]

    def advance(st: dict[str, Any]) -> None:
        """One optimizer step: every adapter and its AdamW state change; the base does not."""
        counter[0] += 1
        gen = torch.Generator(device=g.device).manual_seed(g.seed * 1000 + counter[0])
        for name, t in st["adapters"].items():
            noise = torch.empty_like(t).normal_(0, 1e-4, generator=gen)
            t.add_(noise)
            s = st["optim"]["state"][name]
            s["exp_avg"].mul_(0.9).add_(noise.float(), alpha=0.1)
            s["exp_avg_sq"].mul_(0.999).add_(noise.float().square(), alpha=0.001)
            s["step"].add_(1)
        st["step"] += 1

    w = Workload("finetune", "", state, advance=advance, info={"hidden": d, "lora_rank": r})
    frozen = sum(t.numel() * t.element_size() for t in base.values())
    w.info["frozen_fraction"] = frozen / w.logical_bytes
    w.description = (
        f"frozen bf16 base ({100 * w.info['frozen_fraction']:.1f}% of bytes) + LoRA rank {r} "
        "adapters with fp32 AdamW state; the second save is measured"
    )
    return w


def _small(size: int, g: _Gen, prefix: str) -> Workload:
    count = SMALL_COUNT if size >= SMALL_COUNT * SMALL_BYTES else max(16, size // SMALL_BYTES)
    n = SMALL_BYTES // 4
    params = {
        f"{prefix}p{i:05d}": g.normal(f"p{i}", (n,), torch.float32, 0, 0.02) for i in range(count)
    }
    desc = f"{count} fp32 tensors of {SMALL_BYTES // 1024} KiB"
    return Workload("small", desc, {"params": params, "step": 1}, info={"count": count})


_MAKERS = {"model": _model, "finetune": _finetune, "small": _small, "weights": _weights_only}
assert tuple(_MAKERS) == WORKLOADS


def make_workload(
    name: str,
    size: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Workload:
    """Build workload ``name`` with about ``size`` bytes of tensors per rank, on ``device``.

    With ``world > 1`` every key carries ``rank<N>.`` so ranks hold disjoint tensors (as sharded
    training does) and no engine mistakes them for replicas.
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    g = _Gen(seed * 65537 + rank, torch.device(device))
    prefix = f"rank{rank}." if world > 1 else ""
    with torch.no_grad():
        return _MAKERS[name](size, g, prefix)
