"""One-file checkpoints (docs/format.md section 10): a checkpoint's three files in one file.

The data file comes first, byte for byte, so that every offset in it and in the index stays
valid; index.parquet and MANIFEST.json follow, each at a multiple of 4096; then the table of
contents (TOC, JSON) naming each member, and a fixed trailer as the last bytes. Pure bytes: the
caller reads and writes the file. Every violation is a FormatError (ContainerVersionProblem for a
container of a newer version).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import xxhash

from . import strict_json
from .datafile import HEADER_SIZE, FormatError
from .datafile import TRAILER_SIZE as DATA_TRAILER_SIZE
from .layout import ALIGN, INDEX, MANIFEST, align, datafile_rank
from .manifest import MAX_MANIFEST_BYTES

MAGIC = b"CKGFILE1"
CONTAINER_VERSION = 1
TRAILER_SIZE = 56
MAX_TOC_BYTES = 1 << 20
MIN_DATA_SIZE = HEADER_SIZE + DATA_TRAILER_SIZE

_TRAILER = struct.Struct("<QQ16sII")  # TOC offset, TOC length, TOC xxh3-128, version, zero
_VERSION_FROM_END = 24  # every container version keeps its version (u32) here, and the magic last
_MEMBER_KEYS = ("name", "offset", "size", "xxh3_128")


class ContainerVersionProblem(FormatError):
    """The file is a one-file checkpoint of a container version this reader does not know."""


@dataclass(frozen=True)
class Member:
    """One file of the checkpoint inside the container: where it lies, and its xxh3-128 (text)
    where the TOC holds one (index and manifest; None for the data file, which checks itself)."""

    name: str
    offset: int
    size: int
    xxh3_128: str | None

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Toc:
    """A checked table of contents: the data file, the index and the manifest, in file order."""

    data: Member
    index: Member
    manifest: Member
    offset: int  # where the TOC itself starts

    @property
    def members(self) -> tuple[Member, Member, Member]:
        return (self.data, self.index, self.manifest)

    def gaps(self) -> list[tuple[int, int]]:
        """The (offset, length) of the zero padding after each member, up to the next."""
        nexts = (self.index.offset, self.manifest.offset, self.offset)
        return [(m.end, n - m.end) for m, n in zip(self.members, nexts, strict=True) if n > m.end]


def layout(data_name: str, data_size: int, index: bytes, manifest: bytes) -> Toc:
    """The one layout of a container of these members (the only one a reader accepts)."""
    idx = Member(INDEX, align(data_size), len(index), xxhash.xxh3_128_hexdigest(index))
    man = Member(MANIFEST, align(idx.end), len(manifest), xxhash.xxh3_128_hexdigest(manifest))
    return Toc(Member(data_name, 0, data_size, None), idx, man, align(man.end))


def pack_toc(toc: Toc) -> bytes:
    """The TOC's JSON bytes (compact, members in file order)."""
    members = [{k: getattr(m, k) for k in _MEMBER_KEYS} for m in toc.members]
    return json.dumps({"members": members}, separators=(",", ":")).encode()


def pack_trailer(toc_offset: int, toc: bytes) -> bytes:
    head = _TRAILER.pack(toc_offset, len(toc), xxhash.xxh3_128_digest(toc), CONTAINER_VERSION, 0)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + MAGIC


def tail(data_name: str, data_size: int, index: bytes, manifest: bytes) -> list[bytes]:
    """What a writer appends to a finished data file of ``data_size`` bytes to make it a
    one-file checkpoint, in order: padding, the index, padding, the manifest, padding, the TOC
    and the trailer."""
    toc = layout(data_name, data_size, index, manifest)
    raw = pack_toc(toc)
    return [
        bytes(toc.index.offset - data_size),
        index,
        bytes(toc.manifest.offset - toc.index.end),
        manifest,
        bytes(toc.offset - toc.manifest.end),
        raw,
        pack_trailer(toc.offset, raw),
    ]


def is_container(last: bytes) -> bool:
    """Whether bytes ending a file end with the container's magic."""
    return last[-len(MAGIC) :] == MAGIC


def unpack_trailer(buf: bytes, file_size: int) -> tuple[int, int, bytes]:
    """(TOC offset, TOC length, TOC xxh3-128) from the last ``TRAILER_SIZE`` bytes of a file of
    ``file_size`` bytes, each checked against the file; the version is checked first."""
    if file_size < MIN_DATA_SIZE + TRAILER_SIZE or len(buf) != TRAILER_SIZE:
        raise FormatError(f"file of {file_size} bytes is too short for a one-file checkpoint")
    if buf[-len(MAGIC) :] != MAGIC:
        raise FormatError("no one-file checkpoint trailer at the end (truncated or overwritten?)")
    (version,) = struct.unpack_from("<I", buf, TRAILER_SIZE - _VERSION_FROM_END)
    if version > CONTAINER_VERSION:
        raise ContainerVersionProblem(
            f"one-file checkpoint of container version {version}; this ckptguard reads up to "
            f"{CONTAINER_VERSION}: upgrade ckptguard"
        )
    off, length, digest, _, zero = _TRAILER.unpack_from(buf)
    (h,) = struct.unpack_from("<Q", buf, _TRAILER.size)
    if h != xxhash.xxh3_64_intdigest(buf[: _TRAILER.size]):
        raise FormatError("one-file trailer hash mismatch")
    if version != CONTAINER_VERSION or zero:
        raise FormatError("one-file trailer has an invalid version or non-zero reserved bytes")
    if off % ALIGN or not 0 < length <= MAX_TOC_BYTES:
        raise FormatError("one-file trailer has an invalid TOC offset or length")
    if off + length + TRAILER_SIZE != file_size:
        raise FormatError("one-file trailer does not match the file size")
    return off, length, digest


def parse_toc(raw: bytes, digest: bytes, toc_offset: int) -> Toc:
    """The TOC checked: its hash, strict JSON, exactly the three members in the one layout
    (``layout``'s offsets for their sizes, ending where the TOC starts), sizes in bounds."""
    if xxhash.xxh3_128_digest(raw) != digest:
        raise FormatError("one-file TOC hash mismatch")
    try:
        doc = strict_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"one-file TOC is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"members"} or not isinstance(doc["members"], list):
        raise FormatError("one-file TOC is not an object with exactly the member 'members'")
    if len(doc["members"]) != 3:
        raise FormatError("one-file TOC does not list exactly three members")
    data, idx, man = (_member(m, i) for i, m in enumerate(doc["members"]))
    if datafile_rank(data.name) is None or data.xxh3_128 is not None:
        raise FormatError("one-file TOC: the first member is not a data file without a hash")
    if (idx.name, man.name) != (INDEX, MANIFEST) or idx.xxh3_128 is None or man.xxh3_128 is None:
        raise FormatError("one-file TOC: the index and the manifest do not follow the data file")
    if data.size < MIN_DATA_SIZE or idx.size < 1 or not 0 < man.size <= MAX_MANIFEST_BYTES:
        raise FormatError("one-file TOC: a member size is out of bounds")
    toc = Toc(data, idx, man, toc_offset)
    canonical = (0, align(data.end), align(idx.end), align(man.end))
    if (data.offset, idx.offset, man.offset, toc_offset) != canonical:
        raise FormatError(
            "one-file TOC: members are not back to back at multiples of 4096 from offset 0, "
            "ending where the TOC starts"
        )
    return toc


def _member(m: object, i: int) -> Member:
    if not isinstance(m, dict) or tuple(sorted(m)) != tuple(sorted(_MEMBER_KEYS)):
        raise FormatError(f"one-file TOC member {i} does not have exactly {list(_MEMBER_KEYS)}")
    name, off, size, digest = (m[k] for k in _MEMBER_KEYS)
    ints = all(type(v) is int and v >= 0 for v in (off, size))
    if not isinstance(name, str) or not ints:
        raise FormatError(f"one-file TOC member {i} has an invalid name, offset or size")
    if digest is not None and not (isinstance(digest, str) and _hex32(digest)):
        raise FormatError(f"one-file TOC member {i} has an invalid xxh3_128")
    return Member(name, off, size, digest)


def _hex32(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def check_member(member: Member, data: bytes) -> None:
    """The bytes read for ``member`` are its size and (where the TOC has one) its hash."""
    if len(data) != member.size:
        raise FormatError(f"{member.name}: read {len(data)} bytes of {member.size}")
    if member.xxh3_128 is not None and xxhash.xxh3_128_hexdigest(data) != member.xxh3_128:
        raise FormatError(f"{member.name} does not match its hash in the one-file TOC")


def check_manifest(toc: Toc, body: dict) -> None:
    """The manifest names exactly the container's data file, of its size, and an index of the
    index member's size (its hash in the manifest is checked with the index, as for a
    directory)."""
    files = body["files"]
    if len(files) != 1 or files[0]["name"] != toc.data.name or files[0]["size"] != toc.data.size:
        raise FormatError(
            "the manifest's files are not exactly the one data file of the one-file checkpoint"
        )
    if body["index"]["size"] != toc.index.size:
        raise FormatError("the manifest's index size differs from the one-file index member")
