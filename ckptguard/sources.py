"""Byte sources: where the writer reads tensor bytes from, the tensors or bounded host buffers.

A *source* turns the values a rank writes into a stream of byte pieces, in order, each piece the
C-order bytes of part of one value. ``DIRECT`` hands over each value's host bytes whole (copying
only what is not already contiguous host memory). ``BufferedSource`` streams a state larger than
the host pool: values that are contiguous host memory are read in place, all others (GPU
tensors, strided views) are copied piecewise into two fixed buffers, the copy of the next piece
overlapping the writer's work on the current one. Pieces of one value are whole multiples of the
buffer size except the last, so a writer chunking them gets the same chunks as from one buffer.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
import xxhash


def tensor_bytes(value: Any) -> memoryview:
    """The C-order bytes of a tensor or array on the host (copied only if it must be)."""
    if isinstance(value, np.ndarray):
        return _array_bytes(np.ascontiguousarray(value))
    t = _plain(value.detach())
    if t.numel() == 0:
        return memoryview(b"")
    if t.device.type != "cpu":
        t = t.cpu()
    return _bytes_of(_flat(t.contiguous()))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous 1-D CPU tensor, in place."""
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _array_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, in place."""
    return memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as 1-D with stride 1 (size-1 dims may carry any stride)."""
    return t.as_strided((t.numel(),), (1,))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Resolve lazy conjugate/negative bits (a copy, but only for tensors that carry them)."""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


class ByteSource(Protocol):
    """What the saver reads tensor bytes through."""

    lasting: bool
    """Whether a piece stays valid and unchanged until the save ends (else the writer is done
    with it before the next piece is asked for, as a reused buffer needs)."""

    def stream(self, values: Sequence[Any]) -> Iterator[tuple[int, memoryview]]:
        """(index into ``values``, the next piece of that value's C-order bytes), in order."""
        ...

    def digest(self, value: Any) -> bytes:
        """xxh3-128 of a value's bytes (replicas are compared by it)."""
        ...


class CopyStreams:
    """A dedicated CUDA copy stream per device, ordered once after the caller's stream there.

    ``streams`` (device index -> stream) outlives one save so streams are reused; it is filled
    as devices are met. ``caller_streams`` are the streams whose queued work the copies must
    follow (default: each device's current stream).
    """

    def __init__(self, streams: dict | None = None, caller_streams: dict | None = None) -> None:
        self.streams = {} if streams is None else streams
        self.caller_streams = caller_streams or {}
        self.used: dict[int, Any] = {}  # the streams this user has ordered, by device

    def get(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self.used:
            s = self.streams.get(idx)
            if s is None:
                s = self.streams[idx] = torch.cuda.Stream(device=idx)
            s.wait_stream(self.caller_streams.get(idx) or torch.cuda.current_stream(idx))
            self.used[idx] = s
        return self.used[idx]


class DirectSource:
    """Each value's bytes in one piece (host memory in place, else one whole copy)."""

    lasting = True  # the value's own memory, or a copy that lives as long as its view

    def stream(self, values: Sequence[Any]) -> Iterator[tuple[int, memoryview]]:
        for i, v in enumerate(values):
            yield i, tensor_bytes(v)

    def digest(self, value: Any) -> bytes:
        """xxh3-128 of a value's bytes (replicas are compared by it)."""
        return xxhash.xxh3_128_digest(tensor_bytes(value))


DIRECT = DirectSource()


def _in_place(value: Any) -> memoryview | None:
    """The value's bytes without a copy, if it is contiguous host memory."""
    if isinstance(value, np.ndarray):
        if value.flags.c_contiguous:
            return _array_bytes(value)
        return None
    t = value.detach()
    if t.numel() == 0:
        return memoryview(b"")
    if t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return _bytes_of(_flat(t))
    return None


def gatherable(value: Any) -> bool:
    """Whether ``gather`` takes a value: a numpy array or a CPU tensor (any strides, lazy
    conjugate or negative bits included: ``torch.cat`` resolves them as it copies)."""
    return isinstance(value, np.ndarray) or (type(value) in _TENSOR_TYPES and value.is_cpu)


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _run_key(value: Any) -> Any:
    return value.dtype if isinstance(value, torch.Tensor) else None


def gather(values: Sequence[Any], out: np.ndarray) -> None:
    """Copy the C-order bytes of ``values`` (each ``gatherable``) back to back into the 1-D
    uint8 array ``out``, which they must fill exactly.

    Consecutive tensors of one dtype go in one ``torch.cat`` (one call for a pack of small
    tensors instead of a byte view and a copy per tensor); numpy arrays are copied one by one.
    """
    dst = torch.from_numpy(out)
    at = 0
    with torch.no_grad():  # cat's out= refuses inputs that require grad otherwise
        for dtype, run in itertools.groupby(values, _run_key):
            if dtype is None:
                for a in run:
                    n = a.nbytes
                    _check_room(at + n, len(out))
                    out[at : at + n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                    at += n
                continue
            flat = [t if t.dim() == 1 else t.reshape(-1) for t in run]
            n = sum(map(torch.Tensor.numel, flat)) * flat[0].element_size()
            _check_room(at + n, len(out))
            if n and at % flat[0].element_size():  # misaligned for this dtype: via a copy
                dst[at : at + n] = torch.cat(flat).view(torch.uint8)
            elif n:  # an empty slice cannot be viewed as a wider dtype
                torch.cat(flat, out=dst[at : at + n].view(dtype))
            at += n
    if at != len(out):
        raise ValueError(f"gathered {at} bytes into a buffer of {len(out)}")


def _check_room(end: int, size: int) -> None:
    if end > size:
        raise ValueError(f"gathered values exceed their buffer of {size} bytes")


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if any(s < 0 for s in value.strides) or not value.dtype.isnative:
            value = np.ascontiguousarray(value)  # torch cannot view these in place
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only arrays: we only read them
            return torch.from_numpy(value)
    return _plain(value.detach())


def copy_range(dst: torch.Tensor, t: torch.Tensor, start: int, count: int, nb: bool) -> None:
    """Copy elements ``[start, start+count)`` of ``t``'s C-order flattening into 1-D ``dst``.

    Works on strided views without materializing ``t`` contiguously: whole rows in one copy,
    partial rows at either end by recursing into them. ``nb``: non-blocking (CUDA sources).
    """
    if count == 0:
        return
    if t.is_contiguous():
        dst.copy_(t.reshape(-1)[start : start + count], non_blocking=nb)
        return
    row = t[0].numel()
    i, off = divmod(start, row)
    pos = 0
    if off:
        n = min(row - off, count)
        copy_range(dst[:n], t[i], off, n, nb)
        pos, i = n, i + 1
    full = (count - pos) // row
    if full:
        dst[pos : pos + full * row].view(full, *t.shape[1:]).copy_(t[i : i + full], non_blocking=nb)
        pos, i = pos + full * row, i + full
    if pos < count:
        copy_range(dst[pos:count], t[i], 0, count - pos, nb)


class BufferedSource:
    """Stream values through two host buffers of equal size (see the module docstring).

    ``buffers`` is called once, on the first value that needs a copy, and returns the two uint8
    buffers (pinned for GPU sources). ``streams`` maps a CUDA device index to the stream the
    copies run on (created if missing); ``caller_streams`` are the streams the copies must follow.
    """

    lasting = False  # a piece's buffer takes the piece after next

    def __init__(
        self,
        buffers: Callable[[], list[torch.Tensor]],
        streams: dict | None = None,
        caller_streams: dict | None = None,
    ) -> None:
        self._get_buffers = buffers
        self._buffers: list[torch.Tensor] | None = None
        self.copy_streams = CopyStreams(streams, caller_streams)
        self.copied = 0  # bytes that went through the buffers (for tests and reports)

    def digest(self, value: Any) -> bytes:
        h = xxhash.xxh3_128()
        for _, piece in self.stream([value]):
            h.update(piece)
        return h.digest()

    def stream(self, values: Sequence[Any]) -> Iterator[tuple[int, memoryview]]:
        with ThreadPoolExecutor(1, thread_name_prefix="ckptguard-source") as pool:
            jobs = self._jobs(values)
            job = next(jobs, None)
            fill: Future | None = None  # the copy of ``job``, if it is a copy and has started
            slot = 0  # the buffer the next copy goes to
            while job is not None:
                if job[1] is None and fill is None:
                    fill, slot = pool.submit(self._fill, slot, job), slot ^ 1
                piece = fill.result() if fill is not None else job[1]
                nxt, fill = next(jobs, None), None
                if nxt is not None and nxt[1] is None:  # overlaps the consumer's use of piece
                    fill, slot = pool.submit(self._fill, slot, nxt), slot ^ 1
                yield job[0], piece
                job = nxt

    def _jobs(self, values: Sequence[Any]) -> Iterator[tuple]:
        """(index, in-place bytes or None, tensor, first element, elements) per piece."""
        for i, v in enumerate(values):
            direct = _in_place(v)
            if direct is not None:
                yield i, direct, None, 0, 0
                continue
            t = _as_tensor(v)
            per = self._piece_bytes() // max(t.element_size(), 1)
            n = t.numel()
            if n == 0:
                yield i, memoryview(b""), None, 0, 0
            for start in range(0, n, per):
                yield i, None, t, start, min(per, n - start)

    def _piece_bytes(self) -> int:
        if self._buffers is None:
            self._buffers = self._get_buffers()
            if len(self._buffers) != 2 or self._buffers[0].numel() != self._buffers[1].numel():
                raise ValueError("a buffered source needs two buffers of equal size")
        return self._buffers[0].numel()

    def _fill(self, slot: int, job: tuple) -> memoryview:
        _, _, t, start, count = job
        assert self._buffers is not None
        nbytes = count * t.element_size()
        dst = self._buffers[slot][:nbytes].view(t.dtype)
        if t.device.type == "cuda":
            stream = self.copy_streams.get(t.device)
            with torch.cuda.stream(stream):
                copy_range(dst, t, start, count, True)
                done = torch.cuda.Event()
                done.record(stream)
            done.synchronize()
        else:
            copy_range(dst, t, start, count, False)
        self.copied += nbytes
        return _bytes_of(self._buffers[slot][:nbytes])
