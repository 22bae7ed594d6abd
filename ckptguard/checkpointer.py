"""Async saves: the trainer waits only for a snapshot in a reusable host pool.

``Checkpointer`` owns the pool and two background threads across saves: a capture thread that
copies each state into the pool (in order), and a persist thread that saves each snapshot (in
order, so every rank of a job runs its collectives in the same sequence): with ``ckptguard.save``,
or under ``ckptguard run`` by waiting for the agent that the snapshot was handed over to. A state
too large for the pool is streamed through it by the persist thread while the caller waits.
``save_async`` returns a ``SaveHandle`` (``savehandle``). The pool can be prepared ahead of the
first save on a third thread (``pool.Preparation``), so that save's stall holds no allocation.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import warnings
import weakref
from typing import Any

from . import api, lineage, measure, sign
from .capture import caller_streams, capture, refs_bytes, state_bytes
from .coord import auto as coord_auto
from .errors import (
    AgentError,
    CheckpointerClosedError,
    HostPoolPrepareWarning,
    HostPoolTooSmallError,
    SaveCancelledError,
)
from .filesave import save_file, single_process, wants_one_file
from .format.layout import split_path
from .format.manifest import CheckpointInfo
from .handoff import Handoff
from .onefile import is_file_object
from .options import SaveOptions
from .pool import HostPool, Preparation
from .savehandle import SaveHandle
from .saver import save_state
from .sources import BufferedSource
from .tree import Flat, flatten

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "save_async",
]


_STOP = object()


class Checkpointer:
    """Async checkpointing in a training loop, with a host pool reused across saves.

    ``store``: the directory that ``save``/``save_async``/``load`` names are relative to (an
    absolute path is used as is). ``max_host_bytes`` bounds the pool (None: as large as the
    snapshots need); a state whose tensors need more is not snapshotted but streamed through the
    pool in pieces: the caller then waits until the save has read all of it (the stall grows, the
    memory does not), and the commit still runs in the background. The pool is pinned when CUDA
    is available (``pin_memory``) and reused across saves.

    The pool is allocated, and every page of it touched, on the first save that needs it: inside
    that save's stall. ``prepare`` (a state like the ones to be saved, or the bytes of one
    snapshot) does that on a background thread from construction on, so the constructor returns
    at once and the first save stalls for a copy like every later one; a save that comes sooner
    waits only for the region it needs. ``host_bytes`` does the same before the constructor
    returns. A preparation that fails (out of memory, a pinned allocation refused) changes
    nothing for the saves, which allocate as without one; the next ``save_async`` warns
    (``HostPoolPrepareWarning``). See ``prepare()``.

    The pool holds up to ``max_inflight + 1`` snapshots: up to ``max_inflight`` saves waiting for
    or in their background persist, plus the one being captured. With the default 1 a new save
    waits for the previous save's snapshot, not its commit; a save beyond that waits until the
    oldest has committed, and so does one that would push the pool past ``max_host_bytes``.
    Other keyword arguments are defaults for ``ckptguard.save`` (``compress``, ``overwrite``,
    ``coordinator``, ``timeout``, ...); each call may override them.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        *,
        max_host_bytes: int | None = None,
        host_bytes: int | None = None,
        max_inflight: int = 1,
        pin_memory: bool | None = None,
        handoff: bool | None = None,
        prepare: Any = None,
        **save_defaults: Any,
    ) -> None:
        if type(max_inflight) is not int or max_inflight < 1:
            raise ValueError("max_inflight must be an int >= 1")
        self.store = os.path.abspath(os.fspath(store))
        self.defaults = save_defaults
        self.handoff = Handoff.connect() if handoff is not False else None
        if handoff and self.handoff is None:
            raise AgentError("handoff=True but this process does not run under ckptguard run")
        alloc = self.handoff.allocate if self.handoff is not None else None
        self.pool = HostPool(max_host_bytes, max_inflight + 1, pin_memory, host_bytes, alloc)
        self._streams: dict = {}
        self._lock = threading.Lock()
        self._closed = False
        self._cancel = False
        self._handles: list[SaveHandle] = []
        self._captures: queue.Queue = queue.Queue()
        self._persists: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._preparation: Preparation | None = None
        if prepare is not None:
            self.prepare(prepare)
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            c = ref()
            if c is not None:
                c.close()

        _at_exit(close_at_exit)

    # -- public ---------------------------------------------------------------------------------
    def save_async(
        self, obj: Any, name: str | os.PathLike, *, lazy: bool = False, **kw: Any
    ) -> SaveHandle:
        """Start saving ``obj`` as ``<store>/<name>``; returns a ``SaveHandle``.

        A name ending in ``.pt`` (``.pth``, ``.ckpt``, ...) or ``one_file=True`` makes a one-file
        checkpoint, as ``save`` does: one process's, written beside the path and renamed over it
        in the background; under ``ckptguard run`` it is saved by this process, not the agent.

        Returns once the snapshot is taken (the caller may then change its tensors), or at once
        with ``lazy=True``: then call ``handle.wait_snapshot()`` before changing the state (e.g.
        before the optimizer step). Encoding, writing and the commit run in the background;
        ``handle.result()`` gives the ``CheckpointInfo`` or raises the save's error.
        """
        opts = {**self.defaults, **kw}
        coordinator = opts.pop("coordinator", None)
        one_file = opts.pop("one_file", None)
        SaveOptions.check_names(opts)  # a misspelt option fails here, not later
        if opts.get("mlflow_run") is not None:  # the run active in this thread, not the saver's
            opts["mlflow_run"] = lineage.normalize(opts["mlflow_run"])
        if is_file_object(name):
            raise TypeError("save_async needs a path, not a file object: save(obj, f) writes one")
        path = self._path(name)
        one = wants_one_file(path, one_file)
        # resolved on this thread, in the order of the application's own collectives; a
        # one-file save is one process's: several ranks are refused before any snapshot
        timeout = opts.get("timeout", SaveOptions.timeout)
        coord = single_process(coordinator) if one else coord_auto(coordinator, timeout)
        if opts.get("sign_key") is not None and not one:
            if coord.rank == 0:  # the committer's key: a bad one fails here, before a snapshot
                sign.signer(opts["sign_key"])
            if self.handoff is not None:  # the agent loads it from its file
                opts["sign_key"] = sign.key_path(opts["sign_key"])
        handle = SaveHandle(path, obj, opts, coord, caller_streams(), one)
        with self._lock:
            self._check_open()
            failed = self._preparation and self._preparation.unreported_error()
            if failed:
                warnings.warn(HostPoolPrepareWarning(str(failed)), stacklevel=2)
            self._start_threads()
            self._handles = [h for h in self._handles if not h.done()]
            self._handles.append(handle)
            self._captures.put(handle)
        if not lazy:
            handle.wait_captured()
        return handle

    def prepare(self, state: Any) -> Preparation:
        """Allocate and touch the pool for snapshots of ``state`` on a background thread.

        ``state``: a state like the ones to be saved (only its tensors' sizes are read, here, on
        the calling thread) or the bytes of one snapshot. The pool gets as many regions of that
        size as it may hold (``max_inflight + 1``) within ``max_host_bytes``, one after another;
        a state that must be streamed gets one region of ``max_host_bytes``. Returns the
        ``Preparation``: its ``wait()`` returns once done, or raises ``HostPoolPrepareError``.
        A preparation follows the one before it; ``close()`` stops it.
        """
        if isinstance(state, int) and not isinstance(state, bool):
            if state < 0:
                raise ValueError(f"prepare: a byte count must be >= 0, not {state}")
            nbytes = state
        else:
            nbytes = state_bytes(state)
        with self._lock:
            self._check_open()
            self._preparation = Preparation(self.pool, nbytes, self._preparation)
            return self._preparation

    def save(self, obj: Any, name: str | os.PathLike, **kw: Any) -> CheckpointInfo:
        """Save and wait for the commit (in order after any async saves in flight)."""
        return self.save_async(obj, name, **kw).result()

    def load(self, name: str | os.PathLike | None = None, **kw: Any) -> Any:
        """``ckptguard.load`` of ``<store>/<name>`` (the store's LATEST if no name), after the
        saves in flight have finished."""
        with self._lock:
            self._check_open()
            pending = list(self._handles)
        for h in pending:
            h.wait_finished()
        return api.load(self.store if name is None else self._path(name), **kw)

    def wait(self) -> None:
        """Wait until every save started so far has finished (their errors stay in handles)."""
        with self._lock:
            pending = list(self._handles)
        for h in pending:
            h.wait_finished()

    def close(self, cancel: bool = False) -> None:
        """Finish the saves in flight and stop the background threads; idempotent.

        ``cancel=True`` abandons the saves not yet persisting (their ``result()`` raises
        ``SaveCancelledError``); a save already in its persist finishes, as all ranks of a job
        must take part in its collectives. Further calls raise ``CheckpointerClosedError``.
        """
        with self._lock:
            if self._closed and not self._threads:
                return
            self._closed = True
            self._cancel = self._cancel or cancel
            threads, self._threads = self._threads, []
            if threads:
                self._captures.put(_STOP)
            preparation = self._preparation
        if preparation is not None:  # a capture waiting for its region allocates it instead
            preparation.stop()
        with self.pool.cond:
            self.pool.cond.notify_all()  # a capture waiting for a region sees the cancel
        for t in threads:
            t.join()
        self.pool.close()
        self._streams.clear()
        if self.handoff is not None:
            self.handoff.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def preparation(self) -> Preparation | None:
        """The latest preparation of the pool (``prepare``), or None if there was none."""
        return self._preparation

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _path(self, name: str | os.PathLike) -> str:
        return os.path.join(self.store, os.fspath(name))

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointerClosedError("this Checkpointer is closed")

    def _start_threads(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._capture_loop, name="ckptguard-capture", daemon=True),
            threading.Thread(target=self._persist_loop, name="ckptguard-persist", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _capture_loop(self) -> None:
        while True:
            h = self._captures.get()
            if h is _STOP:
                self._persists.put(_STOP)
                return
            if self._cancel:
                h.snapshot_failed(SaveCancelledError(f"save of {h.path} was cancelled"))
                continue
            try:  # the walk a save makes, once, here: the snapshot is its result
                flat = Flat(*flatten(h.state, bool(h.options.get("allow_pickle"))))
            except Exception as e:
                if self.handoff is None:  # the state cannot be read: the save still takes part
                    h.snapshot_unreadable(e)  # in every collective, so all ranks fail alike
                    self._persists.put(h)
                    continue
                h.snapshot_failed(e)  # under an agent: there is nothing to hand over
                continue
            self._capture(h, flat)

    def _capture(self, h: SaveHandle, flat: Flat) -> None:
        """Copy ``flat`` into the pool (hand it to the agent, under one), or queue it to be
        streamed when it can never fit."""
        region = None
        try:
            need = refs_bytes(flat.refs)
            handed = self.handoff is not None and not h.one_file
            if not self.pool.fits(need):
                if handed:  # every rank must hand over, or none
                    raise HostPoolTooSmallError(
                        f"under ckptguard run a snapshot must fit max_host_bytes="
                        f"{self.pool.max_bytes} (it needs {need} bytes)",
                        need,
                        self.pool.max_bytes or 0,
                    )
                h.stream(flat)
                self._persists.put(h)
                h.wait_captured()  # the persist reads the caller's state; then the next
                return
            region = self.pool.acquire(need, lambda: self._cancel)
            snap = capture(flat, region, self._streams, h.caller_streams)
            snap.wait()
            handoff_id = None
            if handed:  # from here on the agent commits it, come what may
                assert self.handoff is not None
                assert isinstance(region.tag, int)  # the agent's id of the shared pool
                handoff_id = self.handoff.submit(
                    region.buf, region.tag, snap.state, h.path, h.options
                )
        except BaseException as e:
            if region is not None and getattr(e, "ckptguard_region_shared", False):
                self.pool.retire(region)  # the agent may be persisting from it: never reuse
            elif region is not None:
                self.pool.release(region)
            err = SaveCancelledError(f"save of {h.path} was cancelled") if self._cancel else e
            h.snapshot_failed(err)
            return
        h.snapshot_taken(snap, handoff_id)
        self._persists.put(h)

    def _persist_loop(self) -> None:
        while True:
            h = self._persists.get()
            if h is _STOP:
                return
            if h.streamed:
                self._persist_streamed(h)
                continue
            snap = h.snapshot
            assert snap is not None
            try:
                if h.handoff_id is not None:  # handed over: the agent's commit, not ours to cancel
                    assert self.handoff is not None
                    info = self.handoff.result(h.handoff_id)
                elif self._cancel:
                    raise SaveCancelledError(f"save of {h.path} was cancelled")
                else:
                    with measure.clocked(h.clock):
                        info = api.save(
                            snap.state,
                            h.path,
                            coordinator=h.coordinator,
                            one_file=h.one_file,
                            **h.options,
                        )
            except BaseException as e:
                h.finish(error=e)
            else:
                h.finish(info=info)
            finally:
                snap.state = None
                if snap.region is not None:
                    self.pool.release(snap.region)

    def _persist_streamed(self, h: SaveHandle) -> None:
        """Save a state larger than the pool, reading it through the pool while the caller waits
        (its ``wait_snapshot`` returns once every byte has been read, before the commit)."""
        buffers = None
        try:
            if self._cancel:
                raise SaveCancelledError(f"save of {h.path} was cancelled")
            opt = SaveOptions.from_kwargs(h.options)
            buffers = self.pool.stream_buffers(opt.chunk_size, lambda: self._cancel)
            source = BufferedSource(buffers.buffers, self._streams, h.caller_streams)
            if h.one_file:
                info = save_file(h.state, h.path, h.coordinator, opt, source, h.snapshot_read)
            else:
                store, name = split_path(h.path)
                with measure.clocked(h.clock):
                    info = save_state(
                        h.state, store, name, h.coordinator, opt, source, h.snapshot_read
                    )
        except BaseException as e:
            if h.captured():
                h.finish(error=e)
            else:
                h.snapshot_failed(e)
        else:
            h.finish(info=info)
        finally:
            if buffers is not None:
                buffers.release()


def _at_exit(fn: Any) -> None:
    """Run ``fn`` at interpreter exit, before concurrent.futures refuses new work (which the
    persist needs): threading's exit hooks run before it sets that flag; atexit runs after."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError
        register(fn)
    except RuntimeError:
        atexit.register(fn)


_default: Checkpointer | None = None
_default_lock = threading.Lock()


def default_checkpointer() -> Checkpointer:
    """The process-wide Checkpointer behind ``ckptguard.save_async`` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Checkpointer(os.sep)
        return _default


def save_async(obj: Any, path: str | os.PathLike, *, lazy: bool = False, **kw: Any) -> SaveHandle:
    """``ckptguard.save`` in the background: returns a ``SaveHandle`` once the snapshot is taken.
    A ``.pt`` path (or ``one_file=True``) gets a one-file checkpoint, as with ``save``.

    Uses a process-wide ``Checkpointer`` with an unbounded pool, created on first use and closed
    (saves in flight finished) at exit. In a training loop prefer your own ``Checkpointer``: it
    bounds the pool (``max_host_bytes``) and you choose when it is closed.
    """
    where = path if is_file_object(path) else os.path.abspath(os.fspath(path))
    return default_checkpointer().save_async(obj, where, lazy=lazy, **kw)
