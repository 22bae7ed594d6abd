"""The fuzz targets (fuzz_targets.py) under pytest: the kept corpus replayed on every run, and
property-based inputs from hypothesis (raw bytes, edited seeds, and structured edits of the
manifest body, the footer and decoder arguments). Every outcome must be ``ok``, ``skip`` or a
typed error of the format, in bounded time; the Python and native decoders must agree."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fuzz_targets as ft
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memkit import peak_allocation

from ckptguard import encode, io
from ckptguard.format.datafile import FormatError

SETTINGS = settings(
    max_examples=int(os.environ.get("CKPTGUARD_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TARGETS = sorted(ft.TARGETS)


def corpus(target: str) -> list[tuple[str, bytes]]:
    out = [(f"seed{i}", s) for i, s in enumerate(ft.seeds(target))]
    d = os.path.join(ft.CORPUS, target)
    if os.path.isdir(d):
        for n in sorted(os.listdir(d)):
            with open(os.path.join(d, n), "rb") as f:
                out.append((n, f.read()))
    return out


def check(target: str, data: bytes) -> str:
    out = ft.run_one(target, data)
    assert not ft.is_finding(out), f"{target}: {out} on {len(data)} bytes {data[:60]!r}"
    return out


# ---------------------------------------------------------------------------- the corpus


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replay(target: str) -> None:
    """Every kept input (seeds, inputs the fuzzers found interesting, past findings) still gives
    a typed outcome, each within fuzz_targets.SLOW_S."""
    outcomes = [check(target, data) for _, data in corpus(target)]
    assert outcomes
    if target not in ("latest",):
        assert outcomes[0] in ("ok", "skip"), f"the first seed of {target} is valid: {outcomes[0]}"


def test_corpus_is_small() -> None:
    """The kept corpus stays a few MB at most."""
    total = 0
    for dirpath, _, files in os.walk(ft.CORPUS):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    assert total < 4 << 20, total


def test_context_checkpoint_loads(tmp_path: Path) -> None:
    """The context of the targets is a valid committed checkpoint of format v1 (a copy: a
    verify and a load record their events in the store, which must not be the source tree)."""
    import ckptguard

    path = tmp_path / "store" / "checkpoint"
    shutil.copytree(ft.CHECKPOINT, path)
    assert ckptguard.verify(path).ok
    state = ckptguard.load(path)
    assert state["meta"] == {"step": 3, "lr": 0.5, "tag": b"\x00\x01", "t": (1, 2)}


# ---------------------------------------------------------------------------- bytes


@SETTINGS
@given(target=st.sampled_from(TARGETS), data=st.binary(max_size=5000))
def test_any_bytes(target: str, data: bytes) -> None:
    check(target, data)


@st.composite
def edited_seed(draw: st.DrawFn, target: str) -> bytes:
    """A seed of ``target`` with a few edits: bit flips, byte values, cuts, inserted runs."""
    seeds = ft.seeds(target)
    b = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not b:
            break
        pos = draw(st.integers(0, len(b) - 1))
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "int"]))
        if op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            b[pos:pos] = bytes([draw(st.integers(0, 255))]) * draw(st.integers(1, 300))
        else:
            v = draw(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1, 1 << 63]))
            b[pos : pos + 8] = v.to_bytes(8, "little")
    return bytes(b)


@pytest.mark.parametrize("target", TARGETS)
def test_edited_seeds(target: str) -> None:
    @SETTINGS
    @given(edited_seed(target))
    def run(data: bytes) -> None:
        check(target, data)

    run()


# ---------------------------------------------------------------------------- structured


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.sampled_from(ft.INTS)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(ft.STRINGS)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def edited_json(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with a few members or items replaced, removed or added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(JSON)
        elif op == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["$tensor", "$tuple", "extra", "key", "0"]))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return doc


@SETTINGS
@given(edited_json(ft.context().body))
def test_manifest_body_edits(body: Any) -> None:
    """A re-signed manifest body with wrong members, types or values: typed errors only."""
    check("manifest_body", json.dumps(body).encode())


@SETTINGS
@given(edited_json(json.loads(ft.context().footer)))
def test_footer_edits(doc: Any) -> None:
    """A footer with wrong members, rows or values (hash consistent): typed errors only."""
    check("footer", json.dumps(doc).encode())


INT_ARGS = st.sampled_from(ft.INTS) | st.integers(-(2**64), 2**64)


# A tree of tagged values near the strict rules of format.md section 6: valid and non-canonical
# forms of each tag, nested in lists, objects and the container tags.
TAG_VALUES = {
    "$int": st.sampled_from(["5", "-5", "0", "+5", "05", "1_0", "", "x"])
    | st.integers(-(2**80), 2**80).map(str)
    | st.integers(-(2**80), 2**80).map(lambda n: ("0" + str(n)) if n >= 0 else str(n)),
    "$npscalar": st.sampled_from(["int16", "float32", "bool", "bfloat16", "x"]),
    "$size": st.lists(st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, True]), max_size=3),
    "$float": st.sampled_from(["inf", "-inf", "nan", "NaN", "1.0"]),
    "$bytes": st.sampled_from(["", "AA==", "AA", "A===", "****"]),
    "$tensor": st.sampled_from([0, 1, 2, -1, True, "0"]),
    "$dtype": st.sampled_from(["float32", "complex32", "float8_e5m2fnuz", "float128", 1]),
    "$device": st.sampled_from(["cpu", "cuda:0", "meta", "cpu:-1", "x", 0]),
    "$pickle": st.sampled_from(["gAROLg==", "gAROLg", 5]),
}
HEX = st.text(alphabet="0123456789abcdefABCDEF g", max_size=10)
KEYS = st.sampled_from(
    ["a", "b", "$a", "1", 1, 2, -1, True, None, 1.5, -0.0, [1], {"$float": "nan"}]
    + [{"$tuple": [1, "a"]}, {"$bytes": "AA=="}, {"$enum": "m.C", "name": "A"}, {"$tensor": 0}]
)
# Section 6.2's tags (feature tree-types) with members of the right and wrong shapes.
TYPE_LEAVES = st.sampled_from(
    [
        {"$path": "a/b", "class": "PurePosixPath"},
        {"$path": "a//b", "class": "PurePosixPath"},
        {"$path": "C:\\a", "class": "PureWindowsPath"},
        {"$path": "", "class": "Path"},
        {"$path": "x", "class": "PosixPath"},
        {"$enum": "m.C", "name": "A"},
        {"$enum": "m.C", "name": 1},
        {"$meta": "float32", "shape": [2, 0], "requires_grad": True, "parameter": False},
        {"$meta": "int32", "shape": [1], "requires_grad": True, "parameter": False},
        {"$meta": "int32", "shape": [-1], "requires_grad": False, "parameter": True},
        {"$meta": "float64", "shape": [0, 2**62, 2], "requires_grad": False, "parameter": False},
        {"$meta": "float32", "shape": [1], "requires_grad": 0, "parameter": False},
        {"$sparse": "coo", "shape": [2], "parts": [{"$tensor": 0}] * 2, "coalesced": False},
        {"$sparse": "csr", "shape": [2], "parts": [{"$tensor": 1}] * 3, "coalesced": False},
        {"$sparse": "csr", "shape": [2], "parts": [{"$tensor": 1}] * 2, "coalesced": False},
        {"$sparse": "coo", "shape": [-1], "parts": [{"$tensor": 0}] * 2, "coalesced": True},
        {"$sparse": "coo", "shape": [2], "parts": [{"$tensor": 5}] * 2, "coalesced": True},
        {"$structured": [["a", "int8"], ["b", "complex64"]], "shape": [3], "data": {"$tensor": 0}},
        {"$structured": [["a", "int8"], ["", "int8"]], "shape": [3], "data": {"$tensor": 0}},
        {"$structured": [["a", "object"]], "shape": [3], "data": {"$tensor": 0}},
        {"$structured": [["a", "int8"]], "shape": [3], "data": [{"$tensor": 0}]},
        {"$quantized": "qint8", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
        | {"scale": 0.1, "zero_point": 2, "axis": None},
        {"$quantized": "qint8", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
        | {"scale": {"$float": "-inf"}, "zero_point": True, "axis": None},
        {"$quantized": "quint8", "qscheme": "per_channel_affine_float_qparams"}
        | {"int_repr": {"$tensor": 1}, "scale": {"$tensor": 0}, "zero_point": {"$tensor": 1}}
        | {"axis": 0},
        {"$quantized": "quint8", "qscheme": "per_channel_affine", "int_repr": {"$tensor": 1}}
        | {"scale": {"$tensor": 0}, "zero_point": {"$tensor": 1}, "axis": 64},
        {"$quantized": "qint32", "qscheme": "per_channel_affine", "int_repr": {"$tensor": 1}}
        | {"scale": 0.5, "zero_point": {"$tensor": 1}, "axis": 0},
        {"$dtype": "qint32"},
    ]
)


@st.composite
def tagged_tree(draw: st.DrawFn, depth: int = 0) -> Any:
    kind = draw(
        st.sampled_from(
            ["leaf", "tag", "list", "object", "tuple", "dict", "odict"]
            + ["$set", "$frozenset", "$complex", "$slice", "typed", "fields"]
        )
    )
    if depth >= 3 or kind == "leaf":
        return draw(JSON_LEAVES | st.sampled_from([2**63, -(2**63) - 1]))
    kid = tagged_tree(depth + 1)
    if kind.startswith("$"):
        return {kind: draw(st.lists(kid | KEYS, max_size=3))}
    if kind == "typed":
        return draw(TYPE_LEAVES)
    if kind == "fields":
        tag = draw(st.sampled_from(["$namespace", "$dataclass", "$namedtuple"]))
        if tag == "$namespace":
            return {tag: draw(kid)}
        return {tag: draw(st.sampled_from(["m.C", 5])), "fields": draw(kid)}
    if kind == "tag":
        tag = draw(st.sampled_from(sorted(TAG_VALUES)))
        node = {tag: draw(TAG_VALUES[tag])}
        if tag == "$npscalar":
            node["hex"] = draw(HEX)
        return node
    if kind == "list":
        return draw(st.lists(kid, max_size=3))
    if kind == "object":
        return draw(st.dictionaries(st.sampled_from(["a", "b", "c"]), kid, max_size=3))
    if kind == "tuple":
        return {"$tuple": draw(st.lists(kid, max_size=3))}
    pairs = draw(st.lists(st.tuples(KEYS, kid).map(list), max_size=3))
    node = {"$dict" if kind == "dict" else "$odict": pairs}
    if draw(st.integers(0, 3)) == 0:  # section 6.2: metadata (valid on an $odict, when plain)
        node["metadata"] = draw(kid)
    return node


@SETTINGS
@given(tagged_tree())
def test_tree_decoder_agrees_with_the_independent_reader(tree: Any) -> None:
    """Differential: ckptguard's tree decoder and the reader written from the spec accept and
    refuse the same trees (``ft.t_tree``)."""
    check("tree", json.dumps(tree).encode())


@SETTINGS
@given(
    cid=st.sampled_from([0, 1, 2, -1, 255, 1 << 31]),
    elem=st.sampled_from([1, 2, 4, 8, 16, 0, 3, 255, 256, -1, 1 << 31, 1 << 63]),
    raw_len=st.integers(0, 1 << 16) | INT_ARGS,
    payload=st.binary(max_size=2048),
)
def test_decode_arguments(cid: int, elem: int, raw_len: int, payload: bytes) -> None:
    """encode.decode with any arguments: the same bytes on both backends, or a FormatError on
    both; never an allocation before the lengths are checked (raw_len up to 2**64)."""

    def decode() -> None:
        with contextlib.suppress(FormatError):
            ft._both(lambda be: encode.decode(cid, payload, raw_len, elem, backend=be))

    assert peak_allocation(decode) <= 4 * (1 << 16) + (1 << 20)  # outputs of raw_len <= 64 KiB


@SETTINGS
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 7]),
            st.integers(0, 64),  # payload length
            st.integers(-8, 4200) | INT_ARGS,  # raw_len
            st.sampled_from([1, 2, 4, 0, 3, 300]),
            st.booleans(),  # with a hash
            st.integers(-8, 4200) | INT_ARGS,  # dest_offset
        ),
        min_size=1,
        max_size=4,
    ),
    fill=st.integers(0, 255),
)
def test_decode_into_items(items: list[tuple], fill: int) -> None:
    """encode.decode_into with hostile items (lengths, offsets, codecs): ChunkError on both
    backends for the same item, or the same bytes in the destination."""
    built = [
        encode.DecodeItem(c, bytes([fill]) * n, raw, e, bytes(16) if h else None, off)
        for c, n, raw, e, h, off in items
    ]
    outs = []
    for be in ("python", "native") if ft.NATIVE else ("python",):
        dest = np.zeros(4096, np.uint8)

        def decode() -> None:
            try:
                encode.decode_into(dest, built, threads=2, backend=be)  # noqa: B023
                outs.append(("ok", dest.tobytes()))  # noqa: B023
            except encode.ChunkError as e:
                outs.append(("err", e.index))

        assert peak_allocation(decode) < 1 << 20  # nothing sized by a hostile length
    assert len(set(outs)) == 1, outs


# ---------------------------------------------------------------------------- past findings

BACKENDS = ["python", "native"] if ft.NATIVE else ["python"]


@pytest.mark.parametrize("be", BACKENDS)
def test_decoder_findings(be: str) -> None:
    """Inputs the fuzzers found that escaped as ValueError/OverflowError, or that C read as
    other numbers than Python (a negative offset wrapped around to a valid one)."""
    with pytest.raises(FormatError, match="negative"):
        encode.decode(1, b"\x10abc", -1, 1, backend=be)  # was ValueError
    with pytest.raises(FormatError, match="elem_size"):
        encode.decode(1, b"", 0, 1 << 31, backend=be)  # was OverflowError (native)
    dest = np.zeros(4096, np.uint8)
    item = encode.DecodeItem(0, b"x" * 16, 16, 1, None, -(1 << 64) + 100)
    with pytest.raises(encode.ChunkError):  # native wrote at offset 100
        encode.decode_into(dest, [item], backend=be)
    assert not dest.any()
    fd = os.memfd_create("r")
    try:
        os.pwrite(fd, bytes(8192), 0)
        for bad in (
            encode.ReadItem(4096, 1 << 41, 0, 1, 16, 16, bytes(16), 0, 0),  # was ValueError
            encode.ReadItem(4096, 4096, 1 << 31, 1, 16, 16, bytes(16), 0, 0),  # was OverflowError
            encode.ReadItem(4096, 4096, 0, 1, 16, 16, bytes(16), -(1 << 64), 0),
        ):
            with pytest.raises(encode.ChunkError):
                io.read_records(fd, "r", dest, [bad], backend=be)
    finally:
        os.close(fd)


def test_json_nested_beyond_the_stack() -> None:
    from ckptguard.format import strict_json

    with pytest.raises(ValueError, match="nested too deeply"):
        strict_json(b"[" * 100_000)


ZEROS_MIB = encode.encode(bytes(1 << 20), 1, encode.SHUFFLE_ZSTD)[1]  # a tiny frame of 1 MiB


@SETTINGS
@given(
    raw_len=st.integers(0, 1 << 21) | INT_ARGS,
    cut=st.integers(0, 8),
    extra=st.binary(max_size=8),
)
def test_zstd_frame_claims(raw_len: int, cut: int, extra: bytes) -> None:
    """A zstd frame of 1 MiB (a few dozen bytes), cut short or followed by bytes, under any
    raw_len claim: the frame's own content size is checked against raw_len before anything of
    that size is allocated, so only the one true claim decodes."""
    payload = ZEROS_MIB[: len(ZEROS_MIB) - cut] + extra
    outs: list[bytes] = []

    def decode() -> None:
        with contextlib.suppress(FormatError):
            ft._both(lambda be: outs.append(encode.decode(2, payload, raw_len, 1, backend=be)))

    whole = not cut and not extra and raw_len == 1 << 20
    assert peak_allocation(decode) <= (4 << 20 if whole else 1 << 20)
    assert bool(outs) == whole and all(o == bytes(1 << 20) for o in outs)
