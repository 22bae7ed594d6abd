"""The checkpoint engines under test, behind one small interface.

Every engine saves a nested state into a directory under a name and loads it back. Saves that
return a waiter are asynchronous: the caller was blocked only for the call. The harness, not the
engine, fsyncs every file and directory an engine wrote (torch.save, safetensors and h5py never
fsync), so "durable" means the same for all.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .needs import missing
from .treeutil import flatten

Waiter = Callable[[], None]


class Engine:
    """Base: an engine saves ``state`` as ``<dir>/<name>...`` and loads it back."""

    id = "engine"
    family = "peer"  # "ckptguard" or "peer"
    asynchronous = False
    multi_rank = True
    needs_template = False
    note = ""

    def unavailable(self, world: int, device: str) -> str | None:
        """Why this engine cannot run here (None if it can)."""
        return None

    # True for an engine that keeps a pool or a cache from one save to the next: each trial then
    # starts it fresh (``fresh``) and measures its first save apart from a warm one.
    keeps_state = False

    def begin_workload(self) -> None:
        """Called before the first trial of each workload (reset caches)."""

    def fresh(self, state: dict) -> None:
        """Start over as a new engine object would, set up as its user would for ``state`` (what
        this costs, outside any save, is the trial's setup time)."""
        self.end_workload()
        self.begin_workload()

    def end_workload(self) -> None:
        """Called after the last trial of each workload (release caches)."""

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        """Save; return a waiter if the save continues in the background."""
        raise NotImplementedError

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        """Load the state saved as ``name`` onto ``device``."""
        raise NotImplementedError

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        """Paths this rank's save wrote (files or directories)."""
        raise NotImplementedError

    def shared_output(self) -> bool:
        """True when all ranks write into one directory (count its bytes on rank 0 only)."""
        return False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's warnings (e.g. "assuming the intent is to save in a single process")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rank_file(d: str, name: str, rank: int, world: int, ext: str) -> str:
    return os.path.join(d, f"{name}.rank{rank}{ext}" if world > 1 else f"{name}{ext}")


class Ckptguard(Engine):
    """ckptguard.save / ckptguard.load (verify=True), one compression mode."""

    family = "ckptguard"
    multi_rank = True

    def __init__(self, compress: str) -> None:
        self.compress = compress
        self.id = f"ckptguard-{compress}"

    def unavailable(self, world: int, device: str) -> str | None:
        try:
            import ckptguard
        except Exception as exc:  # the core library failed to import
            return f"ckptguard does not import: {exc}"
        if not hasattr(ckptguard, "save"):
            return "ckptguard.save is missing"
        return None

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        import ckptguard

        ckptguard.save(state, os.path.join(d, name), compress=self.compress)
        return None

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        import ckptguard

        where = None if device == "cpu" else device
        return ckptguard.load(os.path.join(d, name), map_location=where, verify=True)

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return [os.path.join(d, name)]

    def shared_output(self) -> bool:
        return True  # one checkpoint directory for all ranks, committed once


class CkptguardAsync(Ckptguard):
    """Checkpointer.save_async (no compression): the caller waits for the snapshot only.

    Each trial makes a new Checkpointer, as a training loop does at its start, given the state's
    size (``host_bytes``: the pool is prepared at construction), then saves twice: the first save
    and a warm one (the pool reused, as across training steps). With ``pool_fraction`` N
    ("ckptguard-async-stream") the pool is bounded to 1/N of the state, which then streams through
    it: the caller waits until the state has been read, and the host memory stays at the bound.
    """

    asynchronous = True
    keeps_state = True

    def __init__(self, pool_fraction: int | None = None) -> None:
        super().__init__("none")
        self.id = "ckptguard-async" if pool_fraction is None else "ckptguard-async-stream"
        self.pool_fraction = pool_fraction
        self.ckpt: Any = None

    def unavailable(self, world: int, device: str) -> str | None:
        why = super().unavailable(world, device)
        if why is None and not hasattr(__import__("ckptguard"), "Checkpointer"):
            why = "ckptguard.Checkpointer is missing"
        return why

    def begin_workload(self) -> None:
        self.ckpt = None  # made on the first save, when the state's size is known

    def end_workload(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
        self.ckpt = None

    def fresh(self, state: dict) -> None:
        self.end_workload()
        self.ckpt = self._make(state)

    def _make(self, state: dict) -> Any:
        import ckptguard
        from ckptguard.capture import state_bytes

        need = state_bytes(state)
        if self.pool_fraction is not None:  # a pool 1/N of the state: it streams through
            bound = max(need // self.pool_fraction, 8 << 20)
            return ckptguard.Checkpointer(".", compress=self.compress, max_host_bytes=bound)
        return ckptguard.Checkpointer(".", compress=self.compress, host_bytes=need)

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        if self.ckpt is None:
            self.ckpt = self._make(state)
        handle = self.ckpt.save_async(state, os.path.abspath(os.path.join(d, name)))

        def wait() -> None:
            handle.result()

        return wait


class TorchSave(Engine):
    """torch.save / torch.load(weights_only=True), one file per rank."""

    id = "torch.save"

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        torch.save(state, _rank_file(d, name, rank, world, ".pt"))
        return None

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        path = _rank_file(d, name, rank, world, ".pt")
        return torch.load(path, map_location=device, weights_only=True)

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return [_rank_file(d, name, rank, world, ".pt")]


class _Dcp(Engine):
    needs_template = True

    def _dir(self, d: str, name: str) -> str:
        return os.path.join(d, name)

    def unavailable(self, world: int, device: str) -> str | None:
        try:
            import torch.distributed.checkpoint  # noqa: F401
        except Exception as exc:
            return f"torch.distributed.checkpoint does not import: {exc}"
        return None

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        import torch.distributed.checkpoint as dcp

        with _quiet():
            dcp.load(template, checkpoint_id=self._dir(d, name))
        return template

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return [self._dir(d, name)]

    def shared_output(self) -> bool:
        return True


class DcpSave(_Dcp):
    """torch.distributed.checkpoint.save / load (FileSystemWriter defaults)."""

    id = "dcp.save"

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        import torch.distributed.checkpoint as dcp

        with _quiet():
            dcp.save(state, checkpoint_id=self._dir(d, name))
        return None


def _waiter(result: Any) -> Waiter:
    """A waiter for what dcp.async_save returned (a Future or an AsyncSaveResponse)."""
    fut = getattr(result, "upload_completion", result)

    def wait() -> None:
        with _quiet():
            fut.result()

    return wait


class DcpAsync(_Dcp):
    """dcp.async_save in its default form (the stager torch picks), thread executor."""

    id = "dcp.async_save"
    asynchronous = True

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        import torch.distributed.checkpoint as dcp

        with _quiet():
            return _waiter(dcp.async_save(state, checkpoint_id=self._dir(d, name)))


class DcpAsyncCached(_Dcp):
    """dcp.async_save with BlockingAsyncStager(cache_staged_state_dict=True), reused across saves.

    That stager pins its cache, which needs an accelerator; without one this engine stages into a
    cached, unpinned CPU copy instead (the best form this torch offers there) and says so.
    """

    id = "dcp.async_save+cached"
    asynchronous = True
    keeps_state = True

    def __init__(self) -> None:
        self.stager: Any = None

    def unavailable(self, world: int, device: str) -> str | None:
        why = super().unavailable(world, device)
        if why:
            return why
        try:
            from torch.distributed.checkpoint.staging import BlockingAsyncStager  # noqa: F401
        except ImportError:
            return "this torch has no BlockingAsyncStager"
        return None

    def begin_workload(self) -> None:
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        if torch.cuda.is_available():
            self.stager = BlockingAsyncStager(cache_staged_state_dict=True)
            self.note = "BlockingAsyncStager(cache_staged_state_dict=True): pinned, cached"
        else:
            self.stager = _UnpinnedCachedStager()
            self.note = "no accelerator: cached unpinned staging (pinning needs a GPU)"

    def end_workload(self) -> None:
        if self.stager is not None:
            self.stager.close()
        self.stager = None

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        import torch.distributed.checkpoint as dcp

        if self.stager is None:
            self.begin_workload()
        with _quiet():
            result = dcp.async_save(
                state, checkpoint_id=self._dir(d, name), async_stager=self.stager
            )
            return _waiter(result)


def _unpinned_cached_stager_cls() -> type:
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    class Stager(BlockingAsyncStager):
        def stage(self, state_dict: dict) -> dict:
            if self.state_dict_cache is None:
                self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=False)
            return _copy_state_dict(state_dict, self.state_dict_cache)

    return Stager


def _UnpinnedCachedStager() -> Any:  # noqa: N802 - a factory standing in for a class
    return _unpinned_cached_stager_cls()(cache_staged_state_dict=True)


class Safetensors(Engine):
    """safetensors.torch.save_file / load_file on the flattened tensors, one file per rank."""

    id = "safetensors"

    def unavailable(self, world: int, device: str) -> str | None:
        return missing("safetensors.torch")

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        from safetensors.torch import save_file

        tensors, other = flatten(state)
        meta = {"other": json.dumps(other, default=str)}
        save_file(tensors, _rank_file(d, name, rank, world, ".safetensors"), metadata=meta)
        return None

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        from safetensors.torch import load_file

        return load_file(_rank_file(d, name, rank, world, ".safetensors"), device=device)

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return [_rank_file(d, name, rank, world, ".safetensors")]


_H5_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}


class H5py(Engine):
    """h5py, one dataset per tensor (bf16 stored as its 16-bit pattern with a dtype attribute)."""

    id = "h5py"

    def unavailable(self, world: int, device: str) -> str | None:
        return missing("h5py", "pip install h5py (a dependency of ckptguard itself)")

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> Waiter | None:
        import h5py

        tensors, other = flatten(state)
        with h5py.File(_rank_file(d, name, rank, world, ".h5"), "w") as f:
            f.attrs["other"] = json.dumps(other, default=str)
            for key, t in tensors.items():
                host = t.detach().cpu()
                view = _H5_VIEW.get(host.dtype)
                ds = f.create_dataset(key, data=(host.view(view) if view else host).numpy())
                ds.attrs["dtype"] = str(host.dtype).removeprefix("torch.")
        return None

    def load(self, d: str, name: str, template: Any, device: str, rank: int, world: int) -> Any:
        import h5py

        out: dict[str, torch.Tensor] = {}
        with h5py.File(_rank_file(d, name, rank, world, ".h5"), "r") as f:

            def visit(key: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    t = torch.from_numpy(np.asarray(obj[()])).reshape(obj.shape)
                    dtype = getattr(torch, obj.attrs["dtype"])
                    out[key] = (t.view(dtype) if t.dtype != dtype else t).to(device)

            f.visititems(visit)
        return out

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return [_rank_file(d, name, rank, world, ".h5")]


def all_engines() -> list[Engine]:
    """Every engine, in the default order (ckptguard modes first, then the peers)."""
    return [
        Ckptguard("auto"),  # the default
        Ckptguard("none"),
        Ckptguard("lz4"),
        Ckptguard("zstd"),
        CkptguardAsync(),
        CkptguardAsync(pool_fraction=8),
        TorchSave(),
        DcpSave(),
        DcpAsync(),
        DcpAsyncCached(),
        Safetensors(),
        H5py(),
    ]


def select_engines(spec: str | None) -> list[Engine]:
    """Engines named in a comma list (ids or prefixes such as ``ckptguard`` or ``dcp``)."""
    engines = all_engines()
    if not spec or spec == "all":
        return engines
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for w in wanted:
        hits = [e for e in engines if e.id == w] or [e for e in engines if e.id.startswith(w)]
        if not hits:
            raise ValueError(
                f"unknown engine {w!r}; choose from {', '.join(e.id for e in engines)}"
            )
        out += [e for e in hits if e not in out]
    return out
