"""ckptguard.keys: Ed25519 key files created whole and private, loaded only when safe."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ckptguard import KeyFileError, SignatureError, keys

pytestmark = pytest.mark.backend_independent  # no checkpoint is saved or read


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, str]:
    return keys.generate(tmp_path / "k")


def test_generate_modes_and_key_id(pair: tuple[str, str, str]) -> None:
    priv, pub, kid = pair
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    key = keys.load_private(priv)
    assert key.key_id == kid == hashlib.sha256(key.public.raw).hexdigest()
    assert keys.load_public(pub) == key.public
    assert keys.load_public(priv) == key.public  # a private key file yields its public half
    assert "PRIVATE" not in repr(key) and kid[:16] in repr(key)


def test_generate_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        priv, _, _ = keys.generate(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600


@pytest.mark.parametrize("existing", [".key", ".pub"])
def test_generate_never_replaces_a_file(tmp_path: Path, existing: str) -> None:
    (tmp_path / f"k{existing}").write_bytes(b"mine")
    with pytest.raises(KeyFileError, match="never replaced"):
        keys.generate(tmp_path / "k")
    assert (tmp_path / f"k{existing}").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == [f"k{existing}"]  # no half pair, no temporary


def test_generate_refuses_a_link_at_the_name(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / "k.key")
    with pytest.raises(KeyFileError):
        keys.generate(tmp_path / "k")
    assert not target.exists()


def test_sign_and_verify(pair: tuple[str, str, str]) -> None:
    key = keys.load_private(pair[0])
    sig = key.sign(b"head")
    key.public.verify(sig, b"head")
    with pytest.raises(SignatureError):
        key.public.verify(sig, b"other")
    with pytest.raises(SignatureError):
        key.public.verify(sig[:-1] + bytes([sig[-1] ^ 1]), b"head")
    other = keys.load_private(keys.generate(Path(pair[0]).parent / "o")[0])
    with pytest.raises(SignatureError):
        other.public.verify(sig, b"head")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o601, 0o644])
def test_private_key_readable_by_others_is_refused(pair: tuple[str, str, str], mode: int) -> None:
    os.chmod(pair[0], mode)
    with pytest.raises(KeyFileError, match="group or others") as e:
        keys.load_private(pair[0])
    assert e.value.path == pair[0]


def test_private_key_link_is_refused(pair: tuple[str, str, str], tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    os.symlink(pair[0], link)
    with pytest.raises(KeyFileError, match="symbolic link"):
        keys.load_private(link)
    with pytest.raises(KeyFileError, match="symbolic link"):
        keys.load_public(link)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    out: list[BaseException] = []

    def load() -> None:
        try:
            keys.load_private(fifo)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "loading a FIFO blocked"
    assert isinstance(out[0], KeyFileError) and "FIFO" in str(out[0])


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"x" * (keys.MAX_KEY_FILE + 1),
    ],
    ids=["empty", "garbage", "bad-pem", "huge"],
)
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.key"
    p.write_bytes(content)
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError):
        keys.load_private(p)
    with pytest.raises(KeyFileError):
        keys.load_public(p)


def test_another_algorithm_is_refused(tmp_path: Path) -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    p = tmp_path / "ec.key"
    p.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        keys.load_private(p)
    q = tmp_path / "ec.pub"
    q.write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        keys.load_public(q)


def test_missing_and_raw(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no key file"):
        keys.load_private(tmp_path / "none.key")
    with pytest.raises(KeyFileError):
        keys.public_from_raw(b"\x00" * 31)
