"""A forger with write access to a store: rewrites one chunk's bytes of a committed checkpoint
and recomputes every checksum that anyone can recompute (docs/security.md).

What it rewrites: the chunk payload (a raw record), its record header's xxh3-128 and header
xxh3-64, the footer row's hash and the trailer's footer hash, the index row's hash, the
manifest's index size and hash, its locator's footer hashes, and the manifest checksum. With
``digests=True`` it also recomputes the chunk's SHA-256 in the footer and the index, the
footer's SHA-256 in the locator and the index's SHA-256 in the manifest: what a forger does
who knows the format. Only a signature over the manifest then
tells the checkpoint from the one that was written.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import xxhash

from ckptguard.encode import sha256
from ckptguard.format import datafile, index, manifest
from ckptguard.format.layout import INDEX, MANIFEST
from ckptguard.format.locator import footer_digests


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(0)
        f.write(data)


def forge_chunk(
    ckpt: str, key: str, mutate: Callable[[bytes], bytes], digests: bool = False, chunk: int = 0
) -> None:
    """Replace the raw bytes of ``key``'s chunk ``chunk`` (a raw record: save with
    compress="none") by ``mutate(old)`` (same length), recomputing the checksums."""
    rows = index.rows_from_table(index.read_table(_read(os.path.join(ckpt, INDEX))))
    r = next(r for r in rows if r.key == key and r.chunk == chunk)
    assert r.codec == "raw" and not r.packed, "forge a raw, unpacked chunk (compress='none')"
    path = os.path.join(ckpt, r.file)
    data = bytearray(_read(path))
    start = r.offset + datafile.RECORD_HEADER_SIZE
    new = mutate(bytes(data[start : start + r.raw_len]))
    assert len(new) == r.raw_len
    data[start : start + r.raw_len] = new
    new_hash = xxhash.xxh3_128_digest(new)
    hdr = data[r.offset : r.offset + datafile.RECORD_HEADER_SIZE]
    hdr[24:40] = new_hash
    hdr[56:64] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(hdr[:56])))
    data[r.offset : r.offset + datafile.RECORD_HEADER_SIZE] = hdr
    foff, flen, _ = datafile.unpack_trailer(bytes(data[-datafile.TRAILER_SIZE :]), len(data))
    footer = bytearray(data[foff : foff + flen])
    row = footer.index(b'"offset":%d,' % r.offset)  # this record's footer row (offsets differ)
    at = footer.index(b'"hash":"', row) + len(b'"hash":"')
    footer[at : at + 32] = new_hash.hex().encode()
    new_digest = sha256(new)
    if digests and r.digest is not None:
        at = footer.index(b'"digest":"', row) + len(b'"digest":"')
        footer[at : at + 64] = new_digest.hex().encode()
    footer = bytes(footer)
    assert len(footer) == flen
    data[foff : foff + flen] = footer
    data[-datafile.TRAILER_SIZE :] = datafile.pack_trailer(foff, footer)
    _write(path, bytes(data))
    r.hash = new_hash
    if digests and r.digest is not None:
        r.digest = new_digest
    rewrite_index(ckpt, rows)


def rewrite_index(ckpt: str, rows: list[index.Row]) -> None:
    """Write ``rows`` as the index and make the manifest match it (size, hashes, checksum)."""
    data = index.write_table(index.to_table(rows))
    _write(os.path.join(ckpt, INDEX), data)
    body = manifest.decode(_read(os.path.join(ckpt, MANIFEST)))
    body["index"] = index.member(data, "sha256" in body["index"])
    if "locator" in body:  # the footers' hashes there (format.md 4.5)
        for i, f in enumerate(body["files"]):
            raw = _read(os.path.join(ckpt, f["name"]))
            foff, flen, _ = datafile.unpack_trailer(raw[-datafile.TRAILER_SIZE :], len(raw))
            got = footer_digests(raw[foff : foff + flen], "footer_sha256" in body["locator"])
            body["locator"]["footers"][i] = got["xxh3_128"]
            if "sha256" in got:
                body["locator"]["footer_sha256"][i] = got["sha256"]
    _write(os.path.join(ckpt, MANIFEST), manifest.encode(body))


def set_first_float(value: float) -> Callable[[bytes], bytes]:
    """A ``mutate`` that sets the first float32 of a chunk to ``value``."""
    return lambda raw: struct.pack("<f", value) + raw[4:]
