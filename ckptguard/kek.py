"""Key-encryption keys (KEKs) of a store's keyring (``keyring``; docs/security.md): where one
comes from (hex text, a key file, a command that prints it, or the environment) and its id.

A KEK never touches the store: it wraps the data keys there. A KMS or Vault plugs in through
``CKPTGUARD_KEK_COMMAND``, a command that prints the KEK, so ckptguard links no KMS client.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import KeyUnavailableError
from .fsutil import UnsafeFileError, open_regular
from .io import pread_exact

__all__ = ["ENV_VARS", "Kek", "kek_from_env", "resolve_kek"]

KEK_BYTES = 32
MAX_KEK_FILE = 4096
COMMAND_TIMEOUT = 60.0  # seconds a KEK command may take
ENV_VARS = ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK", "CKPTGUARD_KEK_COMMAND")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ID_DOMAIN = b"ckptguard kek id v1\0"


@dataclass(frozen=True, repr=False)
class Kek:
    """A 32-byte key-encryption key. Its repr shows only its id, so that a log or a traceback
    never carries the key."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEK_BYTES:
            raise KeyUnavailableError(f"a key-encryption key is {KEK_BYTES} bytes")

    @property
    def kek_id(self) -> str:
        """First 32 hex digits of SHA-256(b"ckptguard kek id v1\\0" + key): names the KEK an
        entry is wrapped under without revealing it."""
        return hashlib.sha256(_ID_DOMAIN + self.key).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"Kek(kek_id={self.kek_id!r})"

    @classmethod
    def from_hex(cls, text: str) -> Kek:
        """The KEK spelled as 64 hex digits (surrounding whitespace ignored)."""
        text = text.strip()
        if not _HEX64.match(text):
            raise KeyUnavailableError("a key-encryption key in hex is 64 hex digits")
        return cls(bytes.fromhex(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Kek:
        """The KEK in key file ``path``: 64 hex digits and an optional newline, or 32 raw bytes.
        The file must be a regular file (no link, FIFO or device) of at most 4 KiB that neither
        group nor others may read or write: a key others can read is not a secret."""
        where = os.fspath(path)
        try:
            fd, st = open_regular(where, max_size=MAX_KEK_FILE)
            try:
                if st.st_mode & 0o077:
                    raise KeyUnavailableError(
                        f"the key file {where} is readable or writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it"
                    )
                raw = pread_exact(fd, st.st_size, 0)
            finally:
                os.close(fd)
        except UnsafeFileError as e:
            raise KeyUnavailableError(f"the key file {where} {e.reason}") from None
        except OSError as e:
            raise KeyUnavailableError(f"cannot read the key file {where}: {e.strerror}") from None
        if len(raw) == KEK_BYTES:
            return cls(raw)
        text = raw.removesuffix(b"\n")
        if len(text) == 64 and _HEX64.match(text.decode("latin-1")):
            return cls(bytes.fromhex(text.decode("ascii")))
        raise KeyUnavailableError(
            f"the key file {where} holds neither 64 hex digits nor {KEK_BYTES} raw bytes"
        )

    @classmethod
    def from_command(cls, command: str) -> Kek:
        """The KEK that ``command`` prints (64 hex digits on stdout). It is split by
        ``shlex.split`` and run without a shell, stdin closed, for at most 60 s; its stderr
        goes to ours. A failure names the command, never its output (which may hold a key)."""
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise KeyUnavailableError(
                f"the KEK command {command!r} cannot be parsed: {e}"
            ) from None
        if not argv:
            raise KeyUnavailableError("the KEK command is empty")
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise KeyUnavailableError(
                f"the KEK command {command!r} did not finish within {COMMAND_TIMEOUT:.0f} s"
            ) from None
        except OSError as e:
            raise KeyUnavailableError(
                f"the KEK command {command!r} cannot be run: {e.strerror}"
            ) from None
        if done.returncode != 0:
            raise KeyUnavailableError(
                f"the KEK command {command!r} failed (exit status {done.returncode})"
            )
        out = done.stdout.strip()
        if len(out) != 64 or not _HEX64.match(out.decode("latin-1")):
            raise KeyUnavailableError(
                f"the KEK command {command!r} did not print 64 hex digits on stdout"
            )
        return cls(bytes.fromhex(out.decode("ascii")))


def kek_from_env(environ: Mapping[str, str] | None = None) -> Kek | None:
    """The KEK the environment configures: exactly one of ``CKPTGUARD_KEK`` (64 hex),
    ``CKPTGUARD_KEK_FILE`` (a key file) or ``CKPTGUARD_KEK_COMMAND`` (a command printing it);
    None if none is set (an empty value counts as unset); KeyUnavailableError if several are."""
    env = os.environ if environ is None else environ
    given = [v for v in ENV_VARS if env.get(v)]
    if len(given) > 1:
        raise KeyUnavailableError(
            f"several key-encryption keys are configured ({', '.join(given)}): set only one"
        )
    if not given:
        return None
    value = env[given[0]]
    if given[0] == "CKPTGUARD_KEK":
        try:
            return Kek.from_hex(value)
        except KeyUnavailableError:
            raise KeyUnavailableError("CKPTGUARD_KEK is not 64 hex digits") from None
    if given[0] == "CKPTGUARD_KEK_FILE":
        return Kek.from_file(value)
    return Kek.from_command(value)


def resolve_kek(kek: Kek | str | os.PathLike | None) -> Kek:
    """A Kek as is; a path (str or PathLike) is a key file; None is the environment's KEK
    (``kek_from_env``), KeyUnavailableError if it configures none."""
    if isinstance(kek, Kek):
        return kek
    if kek is not None:
        return Kek.from_file(kek)
    found = kek_from_env()
    if found is None:
        raise KeyUnavailableError(
            "no key-encryption key: set CKPTGUARD_KEK_FILE, CKPTGUARD_KEK or CKPTGUARD_KEK_COMMAND"
        )
    return found
