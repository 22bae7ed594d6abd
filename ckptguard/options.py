"""The options of a save: the one checked list of them, and the ones every rank must agree on.

``SaveOptions`` holds ``ckptguard.save``'s keyword arguments (``save``, ``Checkpointer`` and the
agent's hand-off all take these fields by name, so an option is added here and nowhere else).
``shaping_options`` / ``check_options`` are how the ranks of one save compare theirs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from . import lineage
from .encode import RAW, SHUFFLE_LZ4, SHUFFLE_ZSTD, check_chunk_size, parse_compress
from .errors import OptionsMismatchError, UnsupportedObjectError
from .format.layout import check_name
from .keys import PrivateKey
from .report import dump_json
from .retention import Policy, as_policy
from .seal import Rule, check_rule
from .sign import check_sign_key, key_path
from .writer import DEFAULT_CHUNK

COMPRESS = {"auto": SHUFFLE_LZ4, "lz4": SHUFFLE_LZ4, "zstd": SHUFFLE_ZSTD, "none": RAW}
"""``compress`` values and the codec id each tries on every chunk (``encode.encode``); "zstd:N"
asks for zstd at level N (``encode.parse_compress``); "auto" lets ``adapt`` choose per stretch
(its entry here is what it is checked as)."""


@dataclass(frozen=True)
class SaveOptions:
    """The options of ``ckptguard.save`` (its keyword arguments but ``coordinator``), checked.

    The one list of them: ``save``, ``Checkpointer`` and the agent's handoff all take these
    fields by name, so an option is added here and nowhere else.
    """

    compress: str = "auto"
    """"none"; "lz4": byte-plane shuffle + LZ4 per chunk where it saves >= 5%; "zstd" (level 1)
    or "zstd:N": the same with zstd at level N (smaller, slower); "auto": raw or a codec per
    stretch, whichever the rates measured during the save say is faster (``adapt``)."""
    metadata: Any = None
    """Plain JSON stored in the manifest."""
    overwrite: bool = False
    """Replace a committed checkpoint of the same name (the new one is committed first)."""
    step: int | None = None
    allow_pickle: bool = False
    """Pickle values that are neither tensors nor plain JSON (else UnsupportedObjectError)."""
    chunk_size: int = DEFAULT_CHUNK
    timeout: float = 600.0
    """Seconds each wait for the other ranks may take."""
    check_replicated: bool = True
    """Refuse replicas whose copies differ; False saves the lowest rank's copy for every rank."""
    digests: bool = False
    """Record every chunk's SHA-256 in the index (feature ``digests``) and the index's in the
    manifest, so that a signature over the manifest covers every byte (docs/security.md)."""
    sign_key: str | os.PathLike | PrivateKey | None = None
    """Sign the checkpoint with this Ed25519 private key (a key file's path, or a loaded key):
    SIGNATURE.json, committed with it (``sign``), and digests on for every rank whatever
    ``digests`` says. Only the committer (rank 0) reads it; the other ranks' value is not used."""

    keep: Policy | Mapping[str, Any] | None = None
    """A retention policy (``retention.Policy`` or a dict of its rules): after each commit, the
    committer (rank 0) prunes the store by it (``Store.prune``); a failure there is a
    ``CheckpointWarning``, never a failed save. Not for one-file checkpoints."""

    base: str | None = None
    """An incremental save (docs/format.md section 4.3): ``"auto"`` compares every chunk with
    the store's LATEST checkpoint, a name with that checkpoint; a chunk it holds unchanged is
    linked, not written again. None: a full save. Not for one-file checkpoints."""
    max_depth: int = 8
    """The most incremental saves in a row: a save whose base is already this deep is full."""

    encrypt: Rule | None = None
    """Encryption at rest (docs/format.md section 4.4): a scope name seals every tensor under
    that scope's data key; ``{pattern: scope or None}`` seals each tensor under the scope of the
    first pattern (``fnmatch``) its key matches (None or no match: in the clear). Data keys live
    in the store's keyring, wrapped by the key-encryption key ``kek``. The object tree (the
    manifest) is never encrypted. Not for one-file checkpoints."""
    kek: Any = None
    """The key-encryption key of an encrypted save: a ``keyring.Kek``, or a key file's path;
    None: from the environment (``CKPTGUARD_KEK_FILE``, ``CKPTGUARD_KEK`` or
    ``CKPTGUARD_KEK_COMMAND``, docs/security.md). Only the committer (rank 0) uses it."""

    mlflow_run: Any = None
    """Training lineage (``lineage``): True (the MLflow run active in the calling thread), a run
    id or an MLflow ``Run``. The committer records the run's id, experiment, params and code
    commit as ``metadata["mlflow"]`` and, after the commit, tags the run with the checkpoint's
    URI and manifest digest. Only the committer (rank 0) uses it."""

    node_local: str | bool = False
    """A node-local save (``localcommit``, docs/operations.md): each rank passes its own node's
    store, which keeps the manifest, the index and the data files of that node's ranks. True
    names the node by ``CKPTGUARD_NODE`` or the host name, a string names it. Not with
    ``overwrite``, ``base``, ``encrypt`` or ``keep``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", as_policy(self.keep))
        object.__setattr__(self, "mlflow_run", lineage.normalize(self.mlflow_run))
        if self.mlflow_run is not None:
            lineage.check_metadata(self.metadata)
        if self.base is not None and (not isinstance(self.base, str) or not self.base):
            raise TypeError(f"base must be 'auto', a checkpoint name or None, not {self.base!r}")
        if self.base not in (None, "auto"):
            check_name(self.base)
        if type(self.max_depth) is not int or not 0 <= self.max_depth <= 1000:
            raise ValueError(f"max_depth must be an int from 0 to 1000, not {self.max_depth!r}")
        parse_compress(self.compress, COMPRESS)
        if self.step is not None and (type(self.step) is not int):
            raise TypeError("step must be an int or None")
        check_chunk_size(self.chunk_size)
        if type(self.digests) is not bool:
            raise TypeError(f"digests must be True or False, not {self.digests!r}")
        check_sign_key(self.sign_key)
        if self.encrypt is not None:
            check_rule(self.encrypt)
            if not isinstance(self.encrypt, str):
                object.__setattr__(self, "encrypt", dict(self.encrypt))
        if not (
            self.kek is None
            or isinstance(self.kek, (str, os.PathLike))
            or hasattr(self.kek, "kek_id")
        ):
            raise TypeError(
                f"kek must be a keyring.Kek, a key file's path or None, not {self.kek!r}"
            )
        self._check_node_local()
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e9:
            raise ValueError(f"timeout must be a number of seconds > 0, not {t!r}")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise UnsupportedObjectError(f"metadata must be plain JSON: {e}", "metadata") from None

    def _check_node_local(self) -> None:
        n = self.node_local
        if not isinstance(n, (str, bool)) or n == "":
            raise TypeError(f"node_local must be True, False or a node's name, not {n!r}")
        if n is False:
            return
        if isinstance(n, str) and (len(n) > 255 or not n.isprintable()):
            raise ValueError(f"node_local: a node name must be printable, 1-255 long, not {n!r}")
        clash = [k for k in ("overwrite", "base", "encrypt", "keep") if getattr(self, k)]
        if clash:
            raise ValueError(
                f"node_local saves do not take {', '.join(clash)}: each node's store holds only "
                "its own part (drain the checkpoint to a shared store for those)"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, options: Mapping[str, Any]) -> None:
        """Raise TypeError naming the options that ``save`` does not take."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown save option(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(cls.names())}"
            )

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> SaveOptions:
        """The options of ``save(**options)``, checked (TypeError for a name it does not take)."""
        cls.check_names(options)
        return cls(**options)

    def to_json(self) -> dict[str, Any]:
        """The options as ``from_kwargs`` takes them back (they travel to the agent as JSON; a
        loaded signing key as the path it was loaded from)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        keep = self.keep.to_json() if isinstance(self.keep, Policy) else None
        kek = self.kek
        if kek is not None and not isinstance(kek, (str, os.PathLike)):
            raise TypeError(
                "kek: a loaded key cannot be handed to another process; pass a key file's path "
                "or set CKPTGUARD_KEK_FILE (or CKPTGUARD_KEK_COMMAND) for it"
            )
        kek = os.fspath(kek) if kek is not None else None
        return {**doc, "sign_key": key_path(self.sign_key), "keep": keep, "kek": kek}


SHAPING = (
    "node_local",  # first: a node-local save's path differs by node, and says so
    "path",
    "overwrite",
    "compress",
    "chunk_size",
    "allow_pickle",
    "check_replicated",
    "step",
    "digests",
    "base",
    "max_depth",
    "encrypt",
)
"""The options of a save that shape what is committed, besides ``metadata``: every rank must
pass the same (its ``path``: the checkpoint's absolute path)."""


def shaping_options(opt: SaveOptions, store: str, name: str) -> dict:
    """This rank's options that shape the checkpoint, as JSON (``metadata`` by its xxh3-128,
    so that large metadata does not travel to rank 0 from every rank)."""
    doc: dict[str, Any] = {k: getattr(opt, k) for k in SHAPING if k != "path"}
    doc["compress"] = list(parse_compress(opt.compress, COMPRESS))
    doc["path"] = name if opt.node_local else os.path.join(store, name)  # a store per node
    doc["node_local"] = bool(opt.node_local)
    doc["metadata"] = "xxh3:" + xxhash.xxh3_128_hexdigest(dump_json(opt.metadata))
    return doc


def check_options(per_rank: list[dict]) -> None:
    """Raise OptionsMismatchError naming the first option the ranks disagree on, with each
    distinct value and the ranks that passed it."""
    for option in (*SHAPING, "metadata"):
        values = [o.get(option) for o in per_rank]
        if all(v == values[0] for v in values):
            continue
        ranks: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            ranks.setdefault(json.dumps(v), []).append(r)
        shown = [f"{_brief(json.loads(v))} on {_ranks(rs)}" for v, rs in ranks.items()]
        more = f", and {len(shown) - 4} other values" if len(shown) > 4 else ""
        raise OptionsMismatchError(
            f"the ranks passed different values of {option!r} to one save: "
            f"{'; '.join(shown[:4])}{more}. Every rank must pass the same; nothing was written",
            option,
            dict(enumerate(values)),
        )


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _ranks(rs: list[int]) -> str:
    head = ", ".join(map(str, rs[:8])) + (f", ... ({len(rs)} ranks)" if len(rs) > 8 else "")
    return f"rank {head}" if len(rs) == 1 else f"ranks {head}"
