"""The one switch between the native chunk pipeline (ckptguard._native) and pure Python.

``CKPTGUARD_NATIVE`` decides, read once at import: ``1`` requires the native path (importing
ckptguard fails loudly without it), ``0`` forces pure Python, unset or ``auto`` uses native when
it was built. ``CKPTGUARD_THREADS`` sets the default thread count; otherwise it is the number of
CPUs this process may run on (``sched_getaffinity``), or Slurm's ``SLURM_CPUS_PER_TASK`` if that
is smaller. ``CKPTGUARD_ODIRECT`` chooses how records reach the disk: ``1`` through O_DIRECT,
``0`` buffered (with early writeback), unset or ``auto`` either, chosen during each save from the
write rates it measures (``ckptguard.adapt``). Both paths write identical bytes
(docs/native.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

ENV = "CKPTGUARD_NATIVE"
THREADS_ENV = "CKPTGUARD_THREADS"
DIRECT_ENV = "CKPTGUARD_ODIRECT"
NATIVE = "native"
PYTHON = "python"


class NativeUnavailableError(ImportError):
    """CKPTGUARD_NATIVE=1 (or backend 'native' was asked for) but the extension is missing."""


def _load() -> tuple[ModuleType | None, str]:
    """Import the extension if allowed; return it (or None) and why that path was chosen."""
    mode = os.environ.get(ENV, "").strip().lower()
    if mode not in ("", "auto", "0", "1"):
        raise ValueError(f"{ENV} must be 0, 1 or auto, not {mode!r}")
    if mode == "0":
        return None, f"pure Python: forced by {ENV}=0"
    try:  # by name: the extension is a leaf, not a layer of the package (see import-linter)
        _native = importlib.import_module(f"{__package__}._native")
    except ImportError as e:
        why = f"ckptguard._native cannot be imported ({e})"
        if mode == "1":
            raise NativeUnavailableError(f"{ENV}=1 but {why}; see docs/native.md") from e
        hint = "; install liblz4-dev and libxxhash-dev, then reinstall ckptguard (docs/native.md)"
        return None, f"pure Python: {why}{hint}"
    forced = f" (required by {ENV}=1)" if mode == "1" else ""
    return _native, f"native: ckptguard._native loaded{forced}"


_module, _reason = _load()
_override: str | None = None
_threads: int | None = None


def available() -> bool:
    """Whether the native extension was built and imported."""
    return _module is not None


def active() -> bool:
    """Whether the native path is the one in use now."""
    return _module is not None and _override != PYTHON


def name() -> str:
    """``"native"`` or ``"python"``: the path in use now."""
    return NATIVE if active() else PYTHON


def reason() -> str:
    """One line saying which path is active and why."""
    if _override == PYTHON and _module is not None:
        return "pure Python: selected in this process (backend.use)"
    return _reason


def native() -> ModuleType:
    """The extension module; NativeUnavailableError if it is not available."""
    if _module is None:
        raise NativeUnavailableError(_reason)
    return _module


def resolve(backend: str | None) -> str:
    """The backend a call uses: ``backend`` if given (checked), else the active one."""
    if backend is None:
        return name()
    if backend == NATIVE:
        native()
        return NATIVE
    if backend == PYTHON:
        return PYTHON
    raise ValueError(f"backend must be 'native', 'python' or None, not {backend!r}")


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Run a block with the given backend as the default (e.g. to compare both in tests)."""
    global _override
    resolve(backend)
    old, _override = _override, backend
    try:
        yield
    finally:
        _override = old


def cpu_count() -> int:
    """CPUs this process may run on: its affinity mask, capped by SLURM_CPUS_PER_TASK."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def default_threads() -> int:
    """Threads of the encode/decode pool: set_threads(), else CKPTGUARD_THREADS, else cpu_count."""
    if _threads is not None:
        return _threads
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, not {env!r}")
        return int(env)
    return cpu_count()


def set_threads(n: int | None) -> None:
    """Set the default thread count for this process (None: back to the environment's)."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError("threads must be a positive int or None")
    _threads = n


def direct_io() -> bool | None:
    """Whether record writes go through O_DIRECT: True (CKPTGUARD_ODIRECT=1; file systems that
    refuse it fall back to buffered), False (``0``), None (unset or ``auto``: the writer chooses
    from what it measures). Another value raises ValueError."""
    mode = os.environ.get(DIRECT_ENV, "").strip().lower()
    if mode not in ("", "auto", "0", "1"):
        raise ValueError(f"{DIRECT_ENV} must be 0, 1 or auto, not {mode!r}")
    return None if mode in ("", "auto") else mode == "1"


def direct_mode() -> str:
    """``"on"``, ``"off"`` or ``"auto"``: ``direct_io`` in words (``ckptguard doctor``)."""
    return {True: "on", False: "off", None: "auto"}[direct_io()]


def _dotted(version: tuple) -> str:
    return ".".join(map(str, version))


def zstd_version(backend: str | None = None) -> str:
    """The version of the zstd library that ``backend``'s encoder uses (the native path's
    linked libzstd, or the one in the ``zstandard`` package)."""
    if resolve(backend) == NATIVE:
        return str(native().library_versions()["zstd"])
    import zstandard

    return _dotted(zstandard.ZSTD_VERSION)


def info() -> dict[str, object]:
    """What ``ckptguard doctor`` reports."""
    out: dict[str, object] = {
        "backend": name(),
        "reason": reason(),
        "threads": default_threads(),
        "cpus": cpu_count(),
        "o_direct": direct_mode(),
    }
    if _module is not None:
        out["libraries"] = _module.library_versions()
    try:
        import lz4

        out["python_lz4"] = f"{lz4.__version__} (LZ4 {lz4.library_version_string()})"
    except Exception as e:  # pragma: no cover - lz4 is a dependency
        out["python_lz4"] = f"unavailable: {e}"
    try:
        import zstandard

        out["python_zstd"] = f"{zstandard.__version__} (zstd {_dotted(zstandard.ZSTD_VERSION)})"
    except Exception as e:  # pragma: no cover - zstandard is a dependency
        out["python_zstd"] = f"unavailable: {e}"
    return out
