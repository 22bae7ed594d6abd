"""ckptguard.encode: the pure chunk functions and the checks every caller shares (no files).

The byte-for-byte agreement of both backends is tests/test_native.py's; here the Python path's
own contracts: the chunk-size rules, length checks before allocating, lowest-index errors.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ckptguard import encode
from ckptguard.format.datafile import FormatError, lz4_max_raw_len
from ckptguard.options import SaveOptions
from ckptguard.writer import RankWriter


@pytest.mark.parametrize("size", [64, 80, 4096, 4 << 20])
def test_check_chunk_size_accepts_multiples_of_16_from_64(size: int):
    encode.check_chunk_size(size)


@pytest.mark.parametrize("size", [-16, 0, 16, 48, 65, 100, 4097])
def test_check_chunk_size_refuses_others_for_save_and_writer(tmp_path, size: int):
    """One rule, one message, for SaveOptions and RankWriter alike; nothing is written."""
    with pytest.raises(ValueError, match="multiple of 16 and at least 64") as direct:
        encode.check_chunk_size(size)
    with pytest.raises(ValueError) as via_save:
        SaveOptions(chunk_size=size)
    with pytest.raises(ValueError) as via_writer:
        RankWriter(str(tmp_path), 0, "0" * 32, chunk_size=size)
    assert str(direct.value) == str(via_save.value) == str(via_writer.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "length,elem,chunk,compress,message",
    [
        (64, 0, 64, True, "elem_size"),
        (64, 256, 64, True, "elem_size"),
        (64, 1, 0, True, "chunk_size"),
        (10, 4, 64, True, "multiples of elem_size"),
        (64, 4, 30, True, "multiples of elem_size"),
    ],
)
def test_check_chunking_refuses(length, elem, chunk, compress, message):
    with pytest.raises(ValueError, match=message):
        encode.check_chunking(length, elem, chunk, compress)


def test_check_chunking_uncompressed_needs_no_whole_elements():
    encode.check_chunking(10, 4, 30, False)  # stored raw: nothing is shuffled


@pytest.mark.parametrize(
    "codec,stored,raw,elem",
    [
        (encode.RAW, 10, 11, 1),  # a raw payload is its raw bytes
        (encode.RAW, -1, -1, 1),
        (encode.SHUFFLE_LZ4, 10, 12, 8),  # elem does not divide raw_len
        (encode.SHUFFLE_LZ4, 10, 12, 0),
        (encode.SHUFFLE_LZ4, 10, lz4_max_raw_len(10) + 1, 1),  # more than LZ4 can expand to
        (encode.RAW, 1, 1, 256),  # elem_size is one byte in a record header
        (7, 1, 1, 1),  # unknown codec
    ],
)
def test_check_lengths_refuses_impossible_payloads(codec, stored, raw, elem):
    with pytest.raises(FormatError):
        encode.check_lengths(codec, stored, raw, elem)


def test_check_dest_refuses_chunks_outside():
    dest = memoryview(bytearray(100))
    encode.check_dest(dest, 0, 100, 0)
    for off, n in [(-1, 10), (91, 10), (0, 101), (0, -1)]:
        with pytest.raises(encode.ChunkError) as e:
            encode.check_dest(dest, off, n, 3)
        assert e.value.index == 3


def test_chunk_error_keeps_kind_and_index():
    hash_err = encode.chunk_error(ValueError("chunk hash mismatch", 4, "hash"))
    other = encode.chunk_error(ValueError("bad", 2, "format"))
    assert type(hash_err) is encode.ChunkHashError and hash_err.index == 4
    assert type(other) is encode.ChunkError and other.index == 2 and other.reason == "bad"


def test_split_chunks_covers_the_buffer_in_order():
    view = memoryview(bytes(range(200)))
    pieces = encode.split_chunks(view, 64)
    assert [len(p) for p in pieces] == [64, 64, 64, 8]
    assert b"".join(bytes(p) for p in pieces) == bytes(view)
    assert encode.split_chunks(memoryview(b""), 64) == []


def test_parallel_map_keeps_order():
    assert encode.parallel_map(lambda x: x * x, list(range(50)), 4) == [x * x for x in range(50)]
    assert encode.parallel_map(lambda x: x, [], 4) == []


def test_first_error_raises_the_lowest_failing_index():
    """Whatever order the threads finish in, the error reported is that of the first bad item,
    as on the native path."""
    ran: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> None:
        with lock:
            ran.append(i)
        if i in (3, 7):
            raise encode.ChunkError("bad", i)

    with pytest.raises(encode.ChunkError) as e:
        encode.first_error(fn, 10, 4)
    assert e.value.index == 3
    assert sorted(ran) == list(range(10))  # every item ran: the others were not cut short


def test_first_error_passes_other_exceptions_through():
    def fn(i: int) -> None:
        raise KeyError(i)

    with pytest.raises(KeyError):
        encode.first_error(fn, 1, 1)


@pytest.mark.parametrize("elem", [1, 2, 4, 8, 16])
def test_encode_decode_roundtrip_and_keep_raw_rule(elem: int):
    rng = np.random.default_rng(elem)
    smooth = np.repeat(rng.integers(0, 4, 512, dtype=np.uint8), 8 * elem).tobytes()
    noise = rng.integers(0, 256, 4096 * elem, dtype=np.uint8).tobytes()
    cid, payload, h = encode.encode(smooth, elem, True)
    assert cid == encode.SHUFFLE_LZ4 and encode.keeps_compressed(len(payload), len(smooth))
    assert h == encode.digest(smooth)
    assert encode.decode(cid, payload, len(smooth), elem, backend="python") == smooth
    cid, payload, h = encode.encode(noise, elem, True)
    assert (cid, payload) == (encode.RAW, noise)  # compression would not save 5%
    assert encode.encode(smooth, elem, False)[:2] == (encode.RAW, smooth)
    short = smooth[: encode.MIN_COMPRESS - elem]
    assert encode.encode(short, elem, True)[0] == encode.RAW


def test_shuffle_unshuffle_inverse():
    data = bytes(range(256)) * 4
    for w in (1, 2, 4, 8, 16):
        assert encode.unshuffle(encode.shuffle(data, w), w) == data
    assert encode.shuffle(b"\x01\x02\x03\x04", 2) == b"\x01\x03\x02\x04"


def test_as_buffer_flat_views_and_refusals():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    view = encode.as_buffer(a)
    assert view.format == "B" and view.ndim == 1 and len(view) == 48
    with pytest.raises(ValueError, match="C-contiguous"):
        encode.as_buffer(a[:, ::2])
    with pytest.raises(ValueError, match="read-only"):
        encode.as_buffer(b"abc", writable=True)
