"""Build script: the pure-Python package plus the optional native extension ckptguard._native.

The extension (native/*.c, plain C11) links the system LZ4, zstd, xxHash and OpenSSL libcrypto
(SHA-256 chunk digests) libraries. When their
headers are missing or the build fails, the install still succeeds with a warning and ckptguard
runs on its pure-Python path (``ckptguard doctor`` says which path is active and why). Set
CKPTGUARD_NATIVE=1 while installing to make a failed native build an error instead, and
CKPTGUARD_NATIVE_PREFIX=/prefix[:/prefix2] to point at libraries outside the usual places
(conda: $CONDA_PREFIX is searched; spack: pkg-config, or that variable). See docs/native.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    "native/module.c",
    "native/chunk.c",
    "native/digest.c",
    "native/pipeline.c",
    "native/pool.c",
    "native/io.c",
    "native/seal.c",
]
HEADERS = ("lz4.h", "zstd.h", "xxhash.h", "openssl/evp.h")
REQUIRED = os.environ.get("CKPTGUARD_NATIVE", "").strip() == "1"
SKIPPED = os.environ.get("CKPTGUARD_NATIVE", "").strip() == "0"


def _warn(msg: str) -> None:
    print(f"WARNING: ckptguard native extension: {msg}", file=sys.stderr)


def _pkg_config(*args: str) -> list[str]:
    exe = shutil.which("pkg-config")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, *args, "liblz4", "libzstd", "libxxhash", "libcrypto"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def _prefixes() -> list[str]:
    found = [p for p in os.environ.get("CKPTGUARD_NATIVE_PREFIX", "").split(os.pathsep) if p]
    for var in ("CONDA_PREFIX", "PREFIX"):
        if os.environ.get(var):
            found.append(os.environ[var])
    return found


def _search_dirs() -> tuple[list[str], list[str]]:
    """Include and library directories beyond the compiler's defaults."""
    inc = [f[2:] for f in _pkg_config("--cflags-only-I") if f.startswith("-I")]
    lib = [f[2:] for f in _pkg_config("--libs-only-L") if f.startswith("-L")]
    for p in _prefixes():
        inc.append(os.path.join(p, "include"))
        lib += [os.path.join(p, "lib"), os.path.join(p, "lib64")]
    for var in ("CPATH", "C_INCLUDE_PATH"):
        inc += [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    inc = [d for d in dict.fromkeys(inc) if os.path.isdir(d)]
    lib = [d for d in dict.fromkeys(lib) if os.path.isdir(d)]
    return inc, lib


def _missing_headers(inc: list[str]) -> list[str]:
    dirs = [*inc, "/usr/local/include", "/usr/include"]
    multiarch = getattr(sys.implementation, "_multiarch", None)
    if multiarch:
        dirs.append(os.path.join("/usr/include", multiarch))
    return [h for h in HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in dirs)]


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a warning (unless CKPTGUARD_NATIVE=1)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # compiler missing, setuptools trouble, ...
            self._give_up(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            self._give_up(e)

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Replace an in-place .so by rename: processes that have it mapped keep the old one."""
        if not str(outfile).endswith(".so") or os.path.isdir(outfile):
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp-{os.getpid()}"
        result = super().copy_file(infile, tmp, *args, **kwargs)
        os.replace(tmp, outfile)
        return (outfile, *result[1:]) if isinstance(result, tuple) else result

    def copy_extensions_to_source(self) -> None:  # inplace: nothing to copy after a failure
        if not getattr(self, "_failed", False):
            super().copy_extensions_to_source()

    def _give_up(self, e: Exception) -> None:
        why = f"build failed ({type(e).__name__}: {e})"
        if REQUIRED:
            raise SystemExit(f"error: CKPTGUARD_NATIVE=1 but the native extension's {why}") from e
        self._failed = True
        _warn(f"{why}; ckptguard will use the pure-Python path")


def _extensions() -> list[Extension]:
    if SKIPPED:
        _warn("CKPTGUARD_NATIVE=0: not building it")
        return []
    inc, lib = _search_dirs()
    missing = _missing_headers(inc)
    if missing:
        msg = (
            f"{', '.join(missing)} not found; install liblz4-dev, libzstd-dev, libxxhash-dev and "
            "libssl-dev (Debian/Ubuntu), lz4-devel, libzstd-devel, xxhash-devel and openssl-devel "
            "(RHEL), or see "
            "docs/native.md"
        )
        if REQUIRED:
            raise SystemExit(
                f"error: CKPTGUARD_NATIVE=1 but {msg} (unset CKPTGUARD_NATIVE to install "
                "without the extension)"
            )
        _warn(f"{msg}; ckptguard will use the pure-Python path")
        return []
    system = ("/usr/lib", "/usr/lib64", "/lib", "/lib64")
    rpath = [d for d in lib if not d.startswith(system)]
    return [
        Extension(
            "ckptguard._native",
            sources=SOURCES,
            depends=["native/ckg.h", "native/pipeline.h"],
            include_dirs=["native", *inc],
            library_dirs=lib,
            runtime_library_dirs=rpath,
            libraries=["lz4", "zstd", "xxhash", "crypto"],
            extra_compile_args=["-std=c11", "-O3", "-pthread", "-Wall", "-Wextra"],
            extra_link_args=["-pthread"],
        )
    ]


os.chdir(HERE)
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    package_data={"ckptguard": ["_native.pyi"]},  # the extension's types, for type checkers
)
