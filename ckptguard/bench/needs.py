"""The packages the benchmark imports beyond ckptguard's own, and how to get one that is missing.

safetensors (a peer) and matplotlib (the PNG charts) come with ``ckptguard[bench]``; without
them the benchmark still runs everything else and says up front what it leaves out.
"""

from __future__ import annotations

import importlib

BENCH_EXTRA = "pip install 'ckptguard[bench]'"


def missing(module: str, install: str = BENCH_EXTRA) -> str | None:
    """Why ``module`` does not import here, naming its package and how to install it, or None."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as unusable as an absent one
        package = module.split(".")[0]
        absent = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == package
        why = (
            f"{package} is not installed"
            if absent
            else f"{package} does not import ({type(exc).__name__}: {exc})"
        )
        return f"{why}; install it with {install}"
    return None
