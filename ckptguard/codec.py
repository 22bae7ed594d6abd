"""Chunk encode/decode (docs/format.md section 7): xxh3-128, byte-plane shuffle, LZ4 block.

This is the pure-Python path; the native path (native/) must produce the same bytes.
"""

from __future__ import annotations

import lz4.block
import numpy as np
import xxhash

from .format.datafile import CODECS, FormatError

RAW = CODECS["raw"]
SHUFFLE_LZ4 = CODECS["shuffle-lz4"]


def digest(raw: memoryview | bytes) -> bytes:
    """xxh3-128 of the raw bytes, canonical (big-endian) form."""
    return xxhash.xxh3_128_digest(raw)


def shuffle(raw: memoryview | bytes, width: int) -> bytes:
    """Byte-plane shuffle: all first bytes of the elements, then all second bytes, ..."""
    if width == 1:
        return bytes(raw)
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, width).T.tobytes()


def unshuffle(data: bytes, width: int) -> bytes:
    if width == 1:
        return data
    a = np.frombuffer(data, dtype=np.uint8)
    return a.reshape(width, -1).T.tobytes()


def keeps_compressed(stored_len: int, raw_len: int) -> bool:
    """The keep-raw rule: compression must save at least 5%."""
    return stored_len * 20 <= raw_len * 19


def encode(raw: memoryview | bytes, elem_size: int, compress: bool) -> tuple[int, bytes, bytes]:
    """Return (codec id, payload, xxh3-128 of raw) for one chunk."""
    h = digest(raw)
    if compress and len(raw) >= 64:
        packed = lz4.block.compress(shuffle(raw, elem_size), mode="default", store_size=False)
        if keeps_compressed(len(packed), len(raw)):
            return SHUFFLE_LZ4, packed, h
    return RAW, bytes(raw) if not isinstance(raw, bytes) else raw, h


def decode(codec: int, payload: bytes, raw_len: int, elem_size: int) -> bytes:
    """Return the raw bytes of a chunk; raises FormatError if the payload cannot be decoded."""
    if codec == RAW:
        if len(payload) != raw_len:
            raise FormatError("raw payload length mismatch")
        return payload
    if codec == SHUFFLE_LZ4:
        if elem_size < 1 or raw_len % elem_size:
            raise FormatError("elem_size does not divide raw_len")
        try:
            data = lz4.block.decompress(payload, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as e:
            raise FormatError(f"LZ4 payload cannot be decoded: {e}") from None
        if len(data) != raw_len:
            raise FormatError("decoded length mismatch")
        return unshuffle(data, elem_size)
    raise FormatError(f"unknown codec id {codec}")
