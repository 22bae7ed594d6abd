"""Ed25519 signing keys: generate a key pair, load either half safely, sign and verify.

The one place that touches key files, for the audit log's tree heads and for anything else that
signs (docs/security.md). The cryptography is the ``cryptography`` package's; this module adds
only the file handling: a private key is created 0600 with its public key beside it, both
appearing whole or not at all and never replacing a file; loading opens without blocking or
following a link, refuses a private key that its group or others may read, and bounds the size
(docs/audit.md section 1 gives the formats).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import KeyFileError, SignatureError
from .fsutil import NewFiles, UnsafeFileError, fsync_dir, open_regular
from .io import pread_exact, write_all

__all__ = [
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "PrivateKey",
    "PublicKey",
    "generate",
    "key_id",
    "load_private",
    "load_public",
    "public_from_raw",
]

PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"
MAX_KEY_FILE = 4096  # a PEM Ed25519 key is about 120 bytes; anything much larger is not one
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_PRIVATE_FORBIDDEN = stat.S_IRWXG | stat.S_IRWXO  # no access at all for group or others


def key_id(raw_public: bytes) -> str:
    """The key id: SHA-256 of the raw 32-byte public key, as 64 lowercase hex digits."""
    return hashlib.sha256(raw_public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: ``raw`` (32 bytes) and its ``key_id``."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, data: bytes, what: str = "") -> None:
        """Check ``signature`` over ``data``; SignatureError naming ``what`` if it fails."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"signature does not verify under key {self.key_id[:16]}", what
            ) from None


class PrivateKey:
    """An Ed25519 private key loaded from ``path``; signs, and knows its public half."""

    def __init__(self, key: Ed25519PrivateKey, path: str = "") -> None:
        self._key = key
        self.path = path
        self.public = PublicKey(
            key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def __repr__(self) -> str:  # never the key itself
        return f"PrivateKey(key_id={self.key_id[:16]}..., path={self.path!r})"


def public_from_raw(raw: bytes, what: str = "") -> PublicKey:
    """A public key from its 32 raw bytes; KeyFileError if they are not one."""
    if len(raw) != RAW_KEY_BYTES:
        raise KeyFileError(f"a public key has {RAW_KEY_BYTES} bytes, not {len(raw)}", what)
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise KeyFileError(f"not an Ed25519 public key ({e})", what) from None
    return PublicKey(bytes(raw))


def generate(prefix: str | os.PathLike) -> tuple[str, str, str]:
    """Create ``PREFIX.key`` (private, 0600) and ``PREFIX.pub`` (public, 0644), PEM.

    Both appear whole or not at all (``fsutil.NewFiles``); an existing file of either name is
    never replaced (KeyFileError). Returns (private path, public path, key id)."""
    prefix = os.path.abspath(os.fspath(prefix))
    priv_path, pub_path = prefix + PRIVATE_SUFFIX, prefix + PUBLIC_SUFFIX
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise KeyFileError(f"{p} exists; a key file is never replaced", p)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dest = os.path.dirname(prefix)
    files = NewFiles(dest)
    try:
        _fill(files.new(os.path.basename(priv_path)), pem, 0o600)
        _fill(files.new(os.path.basename(pub_path)), pub, 0o644)
        files.commit()
    except FileExistsError as e:
        raise KeyFileError(
            f"{e.filename} exists; a key file is never replaced", priv_path
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot write the key pair: {e.strerror or e}", priv_path) from None
    finally:
        files.discard()
    fsync_dir(dest)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return priv_path, pub_path, key_id(raw)


def _fill(tmp: str, data: bytes, mode: int) -> None:
    """Write ``data`` to the new empty file ``tmp`` (never through a link) with exactly ``mode``
    (whatever the umask), before a byte of it is written."""
    fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
    finally:
        os.close(fd)


def _read_key_file(path: str, private: bool) -> bytes:
    """The bytes of key file ``path``, opened by ``fsutil.open_regular`` (no link, no FIFO,
    bounded); a private key's mode is checked on the open descriptor, before a byte is read."""
    try:
        fd, st = open_regular(path, max_size=MAX_KEY_FILE)
    except UnsafeFileError as e:
        raise KeyFileError(f"key file {path} {e.reason}", path) from None
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}", path) from None
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}", path) from None
    try:
        if private and st.st_mode & _PRIVATE_FORBIDDEN:
            raise KeyFileError(
                f"{path} is a private key that its group or others may access (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it (and consider it exposed)",
                path,
            )
        data = pread_exact(fd, st.st_size + 1, 0)
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}", path) from None
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise KeyFileError(f"key file {path} changed size while being read", path)
    return data


def load_private(path: str | os.PathLike) -> PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (``generate``'s), checked: a regular file,
    not a link or FIFO, no access for group or others, at most MAX_KEY_FILE bytes, really an
    unencrypted Ed25519 key. KeyFileError otherwise."""
    path = os.fspath(path)
    data = _read_key_file(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM private key ({e})", path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}, not an Ed25519 key", path)
    return PrivateKey(key, path)


def load_public(path: str | os.PathLike) -> PublicKey:
    """The Ed25519 public key in PEM file ``path`` (``generate``'s ``.pub``); a private key
    file is accepted too (its public half). KeyFileError if it is neither."""
    path = os.fspath(path)
    data = _read_key_file(path, private=False)
    if b"PRIVATE KEY" in data:
        return load_private(path).public
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM public key ({e})", path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}, not an Ed25519 key", path)
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
