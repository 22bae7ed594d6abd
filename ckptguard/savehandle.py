"""The handle of one async save (``Checkpointer.save_async``): what the caller waits on, and the
transitions the Checkpointer's capture and persist threads make on it."""

from __future__ import annotations

import threading
from typing import Any

from . import measure
from .capture import Snapshot
from .coord import Coordinator
from .format.manifest import CheckpointInfo
from .saver import FailedState
from .tree import Flat

__all__ = ["SaveHandle"]


class SaveHandle:
    """One async save: ``wait_snapshot()``, then ``result()`` for its ``CheckpointInfo``."""

    def __init__(
        self,
        path: str,
        obj: Any,
        options: dict[str, Any],
        coordinator: Coordinator,
        streams: dict | None,
        one_file: bool = False,
    ) -> None:
        self.path = path
        self.one_file = one_file  # a one-file checkpoint: one process's, never handed over
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
        self.clock = measure.Clock("async")  # its event's times: the caller's stall, set below

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
        self.clock.stall_s = self.clock.elapsed()
        self._snap_done.set()

    def stream(self, flat: Flat) -> None:
        """Too large for the pool: the persist streams ``flat`` while the caller waits."""
        self.streamed, self._obj = True, flat

    def snapshot_read(self) -> None:
        """A streamed save has read the caller's state: it may change from now on."""
        self._obj = None
        self.clock.stall_s = self.clock.elapsed()
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
