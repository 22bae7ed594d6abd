"""Async saves: the trainer waits only for a snapshot in a reusable host pool.

``Checkpointer`` owns the pool and two background threads across saves: a capture thread that
copies each state into the pool (in order), and a persist thread that saves each snapshot (in
order, so every rank of a job runs its collectives in the same sequence): with ``ckptguard.save``,
or under ``ckptguard run`` by waiting for the agent that the snapshot was handed over to. A state
too large for the pool is streamed through it by the persist thread while the caller waits.
``save_async`` returns a ``SaveHandle``.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from typing import Any

from . import api
from .capture import HostPool, Snapshot, caller_streams, capture, refs_bytes
from .coord import Coordinator
from .coord import auto as coord_auto
from .errors import (
    AgentError,
    CheckpointerClosedError,
    HostPoolTooSmallError,
    SaveCancelledError,
)
from .format.layout import split_path
from .format.manifest import CheckpointInfo
from .handoff import Handoff
from .options import SaveOptions
from .saver import FailedState, save_state
from .sources import BufferedSource
from .tree import Flat, flatten

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "save_async",
]


class SaveHandle:
    """One async save: ``wait_snapshot()``, then ``result()`` for its ``CheckpointInfo``."""

    def __init__(
        self,
        path: str,
        obj: Any,
        options: dict[str, Any],
        coordinator: Coordinator,
        streams: dict | None,
    ) -> None:
        self.path = path
        self._obj: Any = obj
        self._options = options
        self._coordinator = coordinator
        self._streams = streams
        self._snapshot: Snapshot | None = None
        self._snap_done = threading.Event()
        self._done = threading.Event()
        self._snap_error: BaseException | None = None
        self._error: BaseException | None = None
        self._info: CheckpointInfo | None = None
        self._handoff_id: int | None = None  # the agent's id for it, once handed over
        self.streamed = False  # too large for the pool: streamed through it, caller waiting

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Return once the state is copied: the caller may change its tensors from now on.

        Raises the capture's error (the save then failed), or TimeoutError.
        """
        if not self._snap_done.wait(timeout):
            raise TimeoutError(f"snapshot of {self.path} not complete after {timeout} s")
        if self._snap_error is not None:
            raise self._snap_error

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint's ``CheckpointInfo``; raises the save's error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"save of {self.path} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return self._info

    def done(self) -> bool:
        """Whether the save has finished (committed, failed or cancelled)."""
        return self._done.is_set()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error, or None once it committed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"save of {self.path} not finished after {timeout} s")
        return self._error

    def __repr__(self) -> str:
        state = "done" if self.done() else "snapshot taken" if self._snap_done.is_set() else "new"
        return f"SaveHandle({self.path!r}, {state})"

    # -- the Checkpointer's side: what its threads read and the transitions they make -------------
    @property
    def state(self) -> Any:
        """The caller's state (or its ``Flat``, once flattened) while the save still needs it."""
        return self._obj

    @property
    def options(self) -> dict[str, Any]:
        """``save``'s options for this save, by name (``SaveOptions`` fields)."""
        return self._options

    @property
    def coordinator(self) -> Coordinator:
        return self._coordinator

    @property
    def caller_streams(self) -> dict | None:
        """The caller's CUDA streams when it started the save (copies are ordered after them)."""
        return self._streams

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def handoff_id(self) -> int | None:
        """The agent's id of this save once it was handed over (then the agent commits it)."""
        return self._handoff_id

    def captured(self) -> bool:
        """Whether the capture is over (the caller may change its state)."""
        return self._snap_done.is_set()

    def wait_captured(self) -> None:
        """Wait until the capture is over (taken, streamed or failed), without raising."""
        self._snap_done.wait()

    def wait_finished(self) -> None:
        """Wait until the save is over (committed, failed or cancelled), without raising."""
        self._done.wait()

    def snapshot_taken(self, snap: Snapshot, handoff_id: int | None) -> None:
        """The state is in the pool (and handed over to the agent when ``handoff_id``)."""
        self._snapshot, self._handoff_id, self._obj = snap, handoff_id, None
        self._snap_done.set()

    def stream(self, flat: Flat) -> None:
        """Too large for the pool: the persist streams ``flat`` while the caller waits."""
        self.streamed, self._obj = True, flat

    def snapshot_read(self) -> None:
        """A streamed save has read the caller's state: it may change from now on."""
        self._obj = None
        self._snap_done.set()

    def snapshot_unreadable(self, e: BaseException) -> None:
        """The state cannot be flattened: ``wait_snapshot`` raises ``e``; the save goes on to
        its persist with nothing but the error (``result`` raises what the save raises)."""
        self._obj = None
        self._snapshot = Snapshot(FailedState(e), None, [])
        self._snap_error = e
        self._snap_done.set()

    def snapshot_failed(self, e: BaseException) -> None:
        """The capture failed: the save is over with ``e``."""
        self._obj = None
        self._snap_error = e
        self._snap_done.set()
        self.finish(error=e)

    def finish(
        self, info: CheckpointInfo | None = None, error: BaseException | None = None
    ) -> None:
        """The save is over: committed (``info``) or failed (``error``)."""
        self._snapshot = None
        self._obj = None
        self._info, self._error = info, error
        self._done.set()


_STOP = object()


class Checkpointer:
    """Async checkpointing in a training loop, with a host pool reused across saves.

    ``store``: the directory that ``save``/``save_async``/``load`` names are relative to (an
    absolute path is used as is). ``max_host_bytes`` bounds the pool (None: as large as the
    snapshots need); a state whose tensors need more is not snapshotted but streamed through the
    pool in pieces: the caller then waits until the save has read all of it (the stall grows, the
    memory does not), and the commit still runs in the background. ``host_bytes`` (the size of
    one snapshot, if known) allocates the pool at construction, else it is allocated on the
    first save; either way it is reused. The pool is pinned when CUDA is available (``pin_memory``).

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

        Returns once the snapshot is taken (the caller may then change its tensors), or at once
        with ``lazy=True``: then call ``handle.wait_snapshot()`` before changing the state (e.g.
        before the optimizer step). Encoding, writing and the commit run in the background;
        ``handle.result()`` gives the ``CheckpointInfo`` or raises the save's error.
        """
        opts = {**self.defaults, **kw}
        coordinator = opts.pop("coordinator", None)
        SaveOptions.check_names(opts)  # a misspelt option fails here, not later
        # resolved on this thread, in the order of the application's own collectives
        timeout = opts.get("timeout", SaveOptions.timeout)
        coord = coord_auto(coordinator, timeout)
        handle = SaveHandle(self._path(name), obj, opts, coord, caller_streams())
        with self._lock:
            self._check_open()
            self._start_threads()
            self._handles = [h for h in self._handles if not h.done()]
            self._handles.append(handle)
            self._captures.put(handle)
        if not lazy:
            handle.wait_captured()
        return handle

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
            if not self.pool.fits(need):
                if self.handoff is not None:  # every rank must hand over, or none
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
            if self.handoff is not None:  # from here on the agent commits it, come what may
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
                    info = api.save(snap.state, h.path, coordinator=h.coordinator, **h.options)
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
            store, name = split_path(h.path)
            info = save_state(h.state, store, name, h.coordinator, opt, source, h.snapshot_read)
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

    Uses a process-wide ``Checkpointer`` with an unbounded pool, created on first use and closed
    (saves in flight finished) at exit. In a training loop prefer your own ``Checkpointer``: it
    bounds the pool (``max_host_bytes``) and you choose when it is closed.
    """
    return default_checkpointer().save_async(obj, os.path.abspath(os.fspath(path)), lazy=lazy, **kw)
