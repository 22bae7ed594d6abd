"""The agent's side of the snapshot handoff: map the trainer's pools, persist what it hands over.

A trainer under ``ckptguard run`` captures into memory it shares with its agent (a memfd it
passes over the control socket) and hands over a description of the snapshot (docs/agent.md,
"save"). The agent saves it with the other agents, on its own thread and communicator, in the
order received, so a snapshot handed over is committed even if the trainer dies right after.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import measure
from ..coord import Coordinator
from ..failpoints import failpoint, set_rank
from ..format.dtypes import SIZES
from ..format.layout import split_path
from ..options import SaveOptions
from ..report import info_to_json
from ..saver import FailedState, save_state
from ..tree import Flat, TensorRef
from ..views import View

MAX_TENSORS = 10_000_000
DEFAULT_TIMEOUT = 600.0
_REF_FIELDS = ("key", "dtype", "kind", "device")


class HandoffError(ValueError):
    """A handover message that cannot be saved as it is (bad pool, offsets or fields)."""


class Persister:
    """Saves handed-over snapshots in order on one thread; ``busy`` while any is pending.

    ``done(token, reply)`` is called on the worker thread with the reply for each save (a dict:
    ``ok`` and ``info``, or ``type`` and ``error``). ``sign_key`` (``ckptguard run
    --sign-key``) signs every save whose options name no key of their own.
    """

    def __init__(
        self, coord: Coordinator, done: Callable[[Any, dict], None], sign_key: str | None = None
    ) -> None:
        self.coord = coord
        self.done = done
        self.sign_key = sign_key
        set_rank(coord.rank)  # for failpoints reached before the first save
        self.pools: dict[tuple[int, int], mmap.mmap] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self.finished = 0  # saves done (committed or failed), in order
        self._running: tuple[int, float, float] | None = None  # (number, timeout, start)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ckptguard-agent-persist")
        self._thread.daemon = True
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def running(self) -> tuple[int, float, float] | None:
        """The save in progress: its number (1, 2, ... on every rank), timeout and monotonic
        start; None when idle."""
        with self._lock:
            return self._running

    def add_pool(self, client: int, pool: int, fd: int, nbytes: int) -> None:
        """Map the trainer's pool ``pool`` (a memfd of ``nbytes`` bytes); the fd is closed."""
        try:
            if os.fstat(fd).st_size < nbytes or nbytes <= 0:
                raise HandoffError(f"pool {pool}: the shared memory is smaller than {nbytes} bytes")
            self.pools[(client, pool)] = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def forget(self, client: int) -> None:
        """The client went away: drop its pools (saves already queued keep their mapping)."""
        for key in [k for k in self.pools if k[0] == client]:
            del self.pools[key]

    def submit(self, client: int, token: Any, msg: dict) -> None:
        """Queue a save; raises ``HandoffError`` (nothing queued) if the message is unusable."""
        flat, path, options = self._parse(client, msg)
        with self._lock:
            self._pending += 1
        self._jobs.put((token, flat, path, options))

    def close(self) -> None:
        """Finish the saves queued and stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _parse(self, client: int, msg: dict) -> tuple[Flat, str, dict]:
        m = self.pools.get((client, msg.get("pool")))  # type: ignore[arg-type]
        if m is None:
            raise HandoffError(f"unknown pool {msg.get('pool')!r}")
        path, options, tensors = msg.get("path"), msg.get("options"), msg.get("tensors")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HandoffError("'path' must be an absolute path")
        if not isinstance(options, dict) or not isinstance(tensors, list):
            raise HandoffError("'options' must be an object and 'tensors' a list")
        if len(tensors) > MAX_TENSORS:
            raise HandoffError(f"more than {MAX_TENSORS} tensors")
        base = _bytes(m)
        refs = [_ref(t, m, base) for t in tensors]
        return Flat(msg.get("tree"), refs, bool(msg.get("pickle"))), path, options

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            token, flat, path, options = job
            with self._lock:
                self._running = (self.finished + 1, _timeout(options), time.monotonic())
            state: Flat | FailedState = flat
            try:
                try:
                    failpoint("handoff.accepted")
                    store, name = split_path(path)
                    if self.sign_key is not None and options.get("sign_key") is None:
                        options = {**options, "sign_key": self.sign_key}
                    opts = SaveOptions.from_kwargs(options)
                except Exception as e:  # still take part, so every rank reports this failure
                    store, name = os.path.split(path)
                    opts = SaveOptions(timeout=_timeout(options))
                    state = FailedState(e)
                with measure.clocked(measure.Clock("handoff")):  # the trainer's stall: unknown
                    info = save_state(state, store, name, self.coord, opts)
                reply: dict[str, Any] = {"ok": True, "info": info_to_json(info)}
            except BaseException as e:  # the trainer gets the error, as in-process
                reply = {"ok": False, "type": type(e).__name__, "error": str(e)}
            finally:
                del flat, state
            try:
                failpoint("handoff.before_reply")
            except Exception as e:  # the save's outcome stands; a failure here is reported with it
                if reply["ok"]:
                    reply["info"]["warnings"].append(f"after the commit: {type(e).__name__}: {e}")
            with self._lock:
                self._pending -= 1
                self.finished += 1
                self._running = None
            self.done(token, reply)


def _timeout(options: dict) -> float:
    """The save's timeout as the trainer passed it, when it is one (else the default)."""
    t = options.get("timeout")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf:
        return float(t)
    return DEFAULT_TIMEOUT


def _bytes(m: mmap.mmap) -> torch.Tensor:
    """The pool as a uint8 tensor (read-only memory: torch warns, and we only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(memoryview(m), dtype=torch.uint8)


def _ref(t: Any, m: mmap.mmap, base: torch.Tensor) -> TensorRef:
    if not isinstance(t, dict):
        raise HandoffError("each tensor is an object")
    try:
        off, n = int(t["offset"]), int(t["nbytes"])
        fields = {f: str(t[f]) for f in _REF_FIELDS}
        shape = tuple(int(x) for x in t["shape"])
        global_shape = tuple(int(x) for x in t["global_shape"])
        offsets = tuple(int(x) for x in t["offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise HandoffError(f"tensor description: {e}") from None
    key = fields["key"]
    if fields["dtype"] not in SIZES or any(d < 0 for d in shape):
        raise HandoffError(f"tensor {key!r}: bad dtype or shape")
    view = _view(t.get("view"), key, len(shape))
    if view is not None and n == 0:  # its storage, another tensor of the save, holds its bytes
        grad, param = bool(t.get("requires_grad")), bool(t.get("parameter"))
        kind, device = fields["kind"], fields["device"]
        return TensorRef(key, fields["dtype"], shape, kind, device, grad, param, None, view=view)
    if n != math.prod(shape) * SIZES[fields["dtype"]]:
        raise HandoffError(f"tensor {key!r}: {n} bytes do not hold shape {list(shape)}")
    if off < 0 or off + n > len(m):
        raise HandoffError(f"tensor {key!r}: bytes {off}+{n} outside the pool")
    value = base[off : off + n]
    return TensorRef(
        fields["key"],
        fields["dtype"],
        shape,
        fields["kind"],
        fields["device"],
        bool(t.get("requires_grad")),
        bool(t.get("parameter")),
        value,
        global_shape,
        offsets,
        bool(t.get("sharded")),
        per_rank=bool(t.get("per_rank")),
    )


def _view(doc: Any, key: str, ndim: int) -> View | None:
    """A handed-over tensor's ``view`` (a storage key, an element offset and strides)."""
    if doc is None:
        return None
    try:
        view = View(str(doc["storage"]), int(doc["offset"]), tuple(int(s) for s in doc["stride"]))
    except (KeyError, TypeError, ValueError) as e:
        raise HandoffError(f"tensor {key!r}: view: {e}") from None
    if view.offset < 0 or len(view.stride) != ndim or any(s < 0 for s in view.stride):
        raise HandoffError(f"tensor {key!r}: bad view")
    return view
