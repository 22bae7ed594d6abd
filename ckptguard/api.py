"""The public functions: save, load, verify, describe, export."""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import IO, Any, TypeVar, cast

from . import events, foreign, measure
from .agent import client as agent_client
from .coord import Coordinator, current
from .coord import auto as coord_auto
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    FormatVersionError,
    SignatureError,
    brief,
    from_oserror,
)
from .exporter import ExportResult, export_checkpoint, left_out_warning
from .filesave import drop_torch_save_keywords, save_file, wants_one_file
from .format.layout import LATEST, MANIFEST, looks_like_checkpoint, split_path
from .format.manifest import CheckpointInfo
from .loader import load_checkpoint
from .objstore.source import open_checkpoint
from .objstore.url import is_url
from .onefile import is_file_object, open_fileobj
from .open import CheckpointReader, Members, using_kek
from .options import SaveOptions
from .place import MapLocation
from .read import VerifyReport, verify_checkpoint
from .saver import save_state
from .sharedopen import job_coordinator, load_for_job
from .sign import Trusted, TrustSet, trust_set
from .stateful import Path, expand, restore
from .store import Store, note_read
from .validation import latest_valid

T = TypeVar("T")

# A process that saves through this module tells its ``ckptguard run`` agent of each commit.
agent_client.register_commit_hook()


def save(
    obj: Any,
    path: str | os.PathLike | IO[bytes],
    *,
    coordinator: Coordinator | str | None = None,
    one_file: bool | None = None,
    **options: Any,
) -> CheckpointInfo:
    """Save ``obj`` atomically as checkpoint ``<store>/<name>``: whole and verified, or absent.

    A path ending in ``.pt``, ``.pth``, ``.ckpt``, ``.ckg``, ``.bin``, ``.tar`` or ``.pkl`` (or
    any path with ``one_file=True``), or a writable binary file object, gets a one-file
    checkpoint instead, as ``torch.save`` would: one process's save, written beside the path
    and renamed over it (a regular file there is replaced, overwrite or not), readable by
    ``load`` (docs/onefile.md). ``one_file=False`` saves a directory checkpoint whatever the
    name. torch.save's ``pickle_module``, ``pickle_protocol`` and ``_use_new_zipfile_*``
    keywords are accepted and ignored: they choose how torch pickles, and nothing is pickled
    here unless ``allow_pickle``.

    An object with ``state_dict``/``load_state_dict`` (a module, an optimizer, a scheduler: DCP's
    ``Stateful``) anywhere in ``obj`` is saved as its ``state_dict()``; ``load`` with it in the
    template restores it.

    In a distributed job every rank calls ``save`` with its own state (tensors wrapped in
    ``Shard`` or DTensors are pieces of a global tensor; other tensors present on several ranks
    are replicas, written once, whose copies must be equal; wrap a tensor that is each rank's
    own, such as an RNG state, in ``PerRank``: each rank loads its own back).
    ``check_replicated=False`` saves the lowest rank's copy of each replica for every rank
    without refusing copies that differ (ReplicaMismatchWarning says which differed). Every rank
    must pass the same path and options (else OptionsMismatchError on every rank).
    ``compress``: "auto" (the default: raw, LZ4 or zstd per stretch of the stream, whichever the
    rates measured during the save predict fastest; docs/tuning.md), "lz4" (byte-plane shuffle
    + LZ4 per chunk where it saves >= 5%), "zstd" or "zstd:N" (the same with zstd, level 1 or
    N: smaller, slower) or "none". An
    existing name is an error unless ``overwrite``, which commits the new checkpoint first and
    removes the old one after. LATEST then names it.
    ``timeout`` bounds each wait for the other ranks. ``sign_key`` (a private key file from
    ``ckptguard key generate``, or a loaded key) signs the checkpoint: its SIGNATURE.json is
    committed with it, and ``load``/``verify`` with ``trusted_keys`` accept it; only rank 0
    reads the key (a KeyFileError before anything is written), the other ranks need none.
    ``digests=True`` records every chunk's SHA-256 (on whenever it signs; security.md).
    ``keep`` (a ``Policy`` or a dict of its rules) prunes the store after the commit
    (docs/operations.md). ``base="auto"`` (the store's LATEST) or ``base=<name>`` makes the
    save incremental: chunks that checkpoint holds unchanged are linked, not written again
    (at most ``max_depth`` such saves in a row; docs/format.md section 4.3). The options and
    their defaults are the fields of ``SaveOptions``; a name it does not have is a TypeError.
    """
    opt = SaveOptions.from_kwargs(drop_torch_save_keywords(options))
    if wants_one_file(path, one_file):
        return save_file(obj, path, coordinator, opt)
    store, name = split_path(path)  # type: ignore[arg-type]  # a path: not a file object
    return save_state(obj, store, name, coord_auto(coordinator, opt.timeout), opt)


def _save_signature() -> inspect.Signature:
    """``save``'s signature with each option of ``SaveOptions`` spelled out (for help())."""
    sig = inspect.signature(save)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in fields(SaveOptions)
    ]
    return sig.replace(parameters=params)


save.__signature__ = _save_signature()  # type: ignore[attr-defined]


def resolve(path: str | os.PathLike, *, skip_failed_validation: bool = False) -> str:
    """A checkpoint directory for ``path``: itself, or its LATEST if ``path`` is a store
    (``skip_failed_validation``: ``validation.latest_valid``, LATEST or the newest checkpoint
    before it that did not fail validation)."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(p, MANIFEST)):
        return p
    if os.path.lexists(p) and not os.path.isdir(p):
        return p  # a one-file checkpoint, or something else: the reader says what
    latest = Store(p).latest_name() if os.path.lexists(os.path.join(p, LATEST)) else None
    if latest is not None and skip_failed_validation:
        valid = latest_valid(p)
        if valid is not None:
            return valid.path
    if latest is not None:
        target = os.path.join(p, latest)
        if os.path.islink(target) or not os.path.isfile(os.path.join(target, MANIFEST)):
            raise CorruptCheckpointError(
                f"LATEST names {os.path.basename(target)!r}, which is not a committed checkpoint",
                path=p,
                file=LATEST,
            )
        return target
    if not os.path.isdir(p):
        raise CheckpointNotFoundError(f"no checkpoint or store at {p}")
    try:
        names = os.listdir(p)
    except OSError as e:  # e.g. a directory this process may not read
        raise from_oserror(e, p, "cannot read") from None
    if not looks_like_checkpoint(names):
        raise CheckpointNotFoundError(
            f"{p} is neither a committed checkpoint nor a store with LATEST"
        )
    return p  # a damaged checkpoint: the reader says what is missing


def load(
    path: str | os.PathLike | IO[bytes],
    map_location: MapLocation = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    template: Any = None,
    coordinator: Coordinator | str | None = None,
    rank: int | None = None,
    trusted_keys: Trusted | None = None,
    kek: Any = None,
    shredded: str = "raise",
    skip_failed_validation: bool = False,
    collective: bool = False,
    timeout: float = 600.0,
) -> Any:
    """Load what ``save`` stored at ``path`` (a checkpoint, or a store meaning its LATEST).

    Every chunk is checked against its hash unless ``verify=False``; a mismatch raises
    CorruptCheckpointError naming the file, tensor and chunk. With a ``template`` (this rank's
    state: plain tensors, ``Shard`` pieces or DTensors, found by key), each of its tensors is
    filled in place from the saved shards it overlaps, at any world size; only those chunks are
    read. An object of the template with ``state_dict``/``load_state_dict`` (a module, an
    optimizer: DCP's ``Stateful``) has its ``state_dict()`` filled so, then gets the loaded
    state through ``load_state_dict``, and is itself in the result at its place. In a job,
    each rank gets the non-tensor values it saved (rank 0's beyond the saved world size) and
    its own ``PerRank`` tensors; a checkpoint with ``PerRank`` tensors loads only at the saved
    world size (else WorldSizeError) unless ``rank=k`` says to load what saved rank k passed.
    Small tensors saved in one packed record load as views of one buffer per record (at most
    the chunk size): a tensor kept alone keeps that buffer; ``.clone()`` it to free the rest.
    ``collective=True``: every rank of the job loads ``path`` (a restart); rank 0 alone reads
    and checks its manifest and index, sent to the others (``sharedopen``); ``timeout``: seconds.

    ``path`` may also be a checkpoint of another format: a torch.save file (zip or legacy), a
    safetensors file, a sharded safetensors set (its directory or ``*.safetensors.index.json``)
    or a PyTorch DCP directory, told apart by content, read as it is and NOT verified (they
    carry no ckptguard hashes; ``ckptguard import`` makes a verified checkpoint of one).
    ``map_location`` applies (safetensors and DCP tensors were saved on the CPU); pickles go
    through torch's weights-only unpickler (UnsafePickleError for a refused global) unless
    ``allow_pickle=True``, which runs full pickle: arbitrary code from the file. ``template``
    does not apply; ``verify``, ``rank``, ``coordinator``, ``collective`` have nothing to act on.

    ``path`` may be ``s3://bucket/prefix[/name]`` (docs/operations.md), a one-file checkpoint or a
    readable binary file object holding one (read from its position). torch.load's arguments mean
    what they do there: ``map_location`` (a device, a string, a dict of saved -> new device, a
    callable ``f(saved_device)`` or torch's ``f(storage, location)``); ``weights_only=True`` is what
    ``load`` always does, ``weights_only=False`` is ``allow_pickle=True``; ``pickle_module`` may
    only be None or ``pickle``; ``mmap=True`` is refused (chunks are read and verified into memory).

    ``trusted_keys`` (a .pub file, a directory of them, keys, or a list): load only a checkpoint
    signed by one of these keys (``save(sign_key=...)``), else SignatureError (security.md).
    ``kek``: the key-encryption key of encrypted chunks (None: the environment's; security.md);
    ``shredded="meta"``: a tensor of a shredded scope loads as a meta tensor. A LATEST that
    failed validation gives way, with ``skip_failed_validation``, to the newest before it."""
    allow_pickle = _pickle_allowed(allow_pickle, weights_only, pickle_module, mmap)
    trust = _trust(trusted_keys, verify)
    found: list[tuple[Path, Any]] = []
    template, found = (template, found) if template is None else expand(template)
    mine, world = _whose(rank, coordinator)

    def read(p: str | Members | CheckpointReader) -> Any:
        with using_kek(kek):
            return load_checkpoint(
                p, map_location, verify, allow_pickle, template, mine, world, trust, shredded
            )

    job = job_coordinator(collective, coordinator, timeout, path)
    if is_url(path) or is_file_object(path):  # read once: the reader closes it
        out = read(open_checkpoint(path) if is_url(path) else open_fileobj(path))
    else:
        where = cast("str | os.PathLike", path)  # a path: not a file object
        source = foreign.detect(where)
        if source is not None:
            return _load_foreign(where, source, trust, map_location, allow_pickle, template)
        joint = None if job is None else (job, trust, timeout)
        out = _reading_noted(where, read, verify, coordinator, skip_failed_validation, joint)
    return restore(out, found, _not_saved) if found else out


def _reading_noted(
    where: str | os.PathLike,
    read: Callable[[str], T],
    verify: bool,
    coordinator: Coordinator | str | None,
    skip_failed_validation: bool = False,
    joint: tuple[Coordinator, TrustSet | None, float] | None = None,
) -> T:
    """``_reading``, and the load's event in the store, by this job's rank 0 alone (the
    launcher's rank where no collective is set up): not by every rank of a restart. With a
    ``joint`` (the job, the trusted keys, the timeout), ``sharedopen.load_for_job`` (a
    collective load) instead."""
    if joint is not None:
        job, trust, timeout = joint
        p = os.fspath(where)
        locate = lambda: resolve(p, skip_failed_validation=skip_failed_validation)  # noqa: E731
        return load_for_job(job, p, locate, read, (trust, timeout, verify))
    r, size = current(coordinator)

    def run(opening: Callable[[str], None]) -> T:
        def opened(p: str) -> T:
            opening(p)
            return read(p)

        return _reading(where, opened, skip_failed_validation)

    return measure.timed_load(run, (events.env_rank() if size == 1 else r) == 0, verify)


def _load_foreign(
    where: str | os.PathLike,
    source: Any,
    trust: TrustSet | None,
    map_location: MapLocation,
    allow_pickle: bool,
    template: Any,
) -> Any:
    """A checkpoint of another format, read as it is (it carries no signature to trust)."""
    if trust is not None:
        raise _unsigned_foreign(where)
    return foreign.load(
        source, map_location=map_location, allow_pickle=allow_pickle, template=template
    )


def _whose(rank: int | None, coordinator: Coordinator | str | None) -> tuple[int, int | None]:
    """(the rank whose values a load returns, this job's world size or None)."""
    if rank is None:
        return current(coordinator)
    if type(rank) is not int or rank < 0:
        raise ValueError(f"rank must be an int >= 0 or None, not {rank!r}")
    return rank, None


def _trust(trusted_keys: Trusted | None, verify: bool = True) -> TrustSet | None:
    """The trusted keys of a load or verify; a signature covers the chunks only through their
    digests, so trusting keys without checking the chunks (``verify=False``) is refused."""
    trust = trust_set(trusted_keys)
    if trust is not None and not verify:
        raise ValueError("trusted_keys needs verify=True: the signature covers the chunks' bytes")
    return trust


def _unsigned_foreign(path: str | os.PathLike) -> SignatureError:
    p = os.fspath(path)
    return SignatureError(f"{p} is not a ckptguard checkpoint: it carries no signature", p)


def _not_saved(path: tuple) -> CheckpointError:
    """The error for a stateful object of the template whose place the checkpoint lacks."""
    where = "/".join(map(str, path)) or "<root>"
    return CheckpointError(
        f"the template holds an object with load_state_dict at {where!r}, but the checkpoint "
        "has no state there to give it"
    )


def _pickle_allowed(
    allow_pickle: bool, weights_only: bool | None, pickle_module: Any, mmap: bool | None
) -> bool:
    """Whether a load may unpickle, from ``allow_pickle`` and torch.load's keywords."""
    if pickle_module is not None and pickle_module is not pickle:
        raise TypeError(
            "ckptguard.load takes pickle_module only as None or pickle: it unpickles nothing "
            "but the values a save stored with allow_pickle=True, with the standard module"
        )
    if mmap:
        raise ValueError(
            "mmap=True is not supported: ckptguard.load reads and verifies every chunk into "
            "memory (pass a template to fill existing tensors in place)"
        )
    if weights_only is None:
        return allow_pickle
    if weights_only and allow_pickle:
        raise ValueError("weights_only=True and allow_pickle=True contradict each other")
    return not weights_only


def verify(
    path: str | os.PathLike | IO[bytes],
    progress: Callable[[int, int], None] | None = None,
    *,
    trusted_keys: Trusted | None = None,
    kek: Any = None,
) -> VerifyReport:
    """Check every byte of a checkpoint (or a store's LATEST); report all problems found.

    ``path`` may be a readable binary file object holding a one-file checkpoint, read from its
    position as ``load`` reads it, or ``s3://...`` as ``load`` reads it (no audit entry or
    event is written for a bucket). A checkpoint of another format (torch.save, safetensors,
    DCP) at a path has no ckptguard hashes: ForeignCheckpointError, which suggests ``ckptguard
    import``. ``trusted_keys``: as ``load``'s; a signature that is missing or does not verify
    under them raises SignatureError (the report's ``signed_by`` names the key that signed).
    ``kek``: as ``load``'s; encrypted chunks whose key cannot be had are checked as stored
    (ciphertext) only, counted by scope in the report's ``keyless``."""
    if kek is not None:
        with using_kek(kek):
            return verify(path, progress, trusted_keys=trusted_keys)
    trust = _trust(trusted_keys)
    if is_url(path):  # resolved first: a damaged LATEST raises, as a store's does
        ckpt = open_checkpoint(path)
        return verify_checkpoint(lambda: ckpt, progress, trust)
    if is_file_object(path):
        return verify_checkpoint(lambda: open_fileobj(path), progress, trust)
    path = cast("str | os.PathLike", path)  # a path: not a file object
    source = foreign.detect(path)
    if source is not None:
        raise foreign.not_ckptguard(source)
    return _reading(path, lambda p: _verify_noted(p, progress, trust))


def _verify_noted(
    path: str, progress: Callable[[int, int], None] | None, trust: TrustSet | None = None
) -> VerifyReport:
    """``verify_checkpoint``, its outcome recorded in the store's audit log (if it has one) and
    as its ``verify`` event."""
    clock = measure.Clock("verify")
    try:
        report = verify_checkpoint(path, progress, trust)
    except (CorruptCheckpointError, FormatVersionError, SignatureError) as e:
        note_read(path, "verify", {"result": "failed", "error": brief(e)[:1000]})
        measure.record_verify(path, clock, None, e)
        raise
    result = "ok" if report.ok else "failed"
    note_read(path, "verify", {"result": result, "problems": len(report.problems)})
    measure.record_verify(path, clock, report, None)
    return report


def export(
    checkpoint: str | os.PathLike,
    *,
    to: str,
    dest: str | os.PathLike,
    select: str | None = None,
    max_shard_size: int | str | None = None,
    strict: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    rank: int = 0,
) -> ExportResult:
    """Write a checkpoint (or a store's LATEST) as files other tools read, into directory
    ``dest`` (created if missing): ``to="safetensors"`` (model.safetensors, or with
    ``max_shard_size`` such as "5GB" shards and the Hugging Face index
    model.safetensors.index.json), ``"hdf5"`` (checkpoint.h5) or ``"torch"`` (checkpoint.pt).

    Every tensor is read whole (a sharded save is consolidated) and checked against its hashes
    as it is written: corruption raises CorruptCheckpointError and leaves no file under its
    final name. Only one tensor is in memory at a time (torch: the whole object). ``select``
    exports the subtree at a key path such as "model" (parts "/"-separated, as ``ckptguard
    info`` shows keys), named relative to it. safetensors holds only tensors: the values it
    cannot hold are left out (``ExportWarning``, ``ExportResult.left_out``), or refused with
    ExportError under ``strict``. Existing files are replaced only with ``force``. Values are
    what saved rank ``rank`` saved (its non-tensor values and ``PerRank`` tensors).
    """
    result = _reading(
        checkpoint,
        lambda p: export_checkpoint(
            p,
            to,
            dest,
            select=select,
            max_shard_size=max_shard_size,
            strict=strict,
            force=force,
            allow_pickle=allow_pickle,
            rank=rank,
        ),
    )
    warning = left_out_warning(result)
    if warning is not None:
        warnings.warn(warning, stacklevel=2)
    return result


def _reading(path: str | os.PathLike, read: Callable[[str], T], skip_failed: bool = False) -> T:
    """``read(resolve(path))``, once more if the checkpoint was replaced under the read.

    An overwrite commits the new checkpoint before it removes the old one, so the name (or
    LATEST) then leads to a whole checkpoint: that is what the caller asked for. A second race
    raises CheckpointReplacedError (the name is being overwritten continuously)."""
    try:
        return read(resolve(path, skip_failed_validation=skip_failed))
    except CheckpointReplacedError:
        return read(resolve(path, skip_failed_validation=skip_failed))


@dataclass
class TensorSummary:
    key: str
    dtype: str
    shape: tuple[int, ...]
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunks: int = 0
    codecs: dict[str, int] = field(default_factory=dict)
    scope: str | None = None
    """The encryption scope its bytes are sealed under (docs/format.md 4.4); None: in the clear."""


@dataclass
class CheckpointDescription:
    info: CheckpointInfo
    tensors: list[TensorSummary]


def describe(path: str | os.PathLike | IO[bytes]) -> CheckpointDescription:
    """Tensors, sizes and codecs of a checkpoint, from its manifest and index (no data read).
    ``path`` may be a readable binary file object holding a one-file checkpoint, read from its
    position as ``load`` reads it."""
    if is_url(path):
        return _describe(open_checkpoint(path))
    if is_file_object(path):
        return _describe(open_fileobj(path))
    return _reading(cast("str | os.PathLike", path), _describe)


def _describe(p: str | Members) -> CheckpointDescription:
    with CheckpointReader(p) as rd:
        out = [TensorSummary(t["key"], t["dtype"], tuple(t["shape"])) for t in rd.tensors]
        for r in rd.rows:
            s = out[r.tensor]
            s.raw_bytes += r.raw_len
            s.stored_bytes += r.stored_len
            s.chunks += 1
            s.codecs[r.codec] = s.codecs.get(r.codec, 0) + 1
            if r.key_id is not None:
                s.scope = rd.key_scopes[r.key_id]
        return CheckpointDescription(CheckpointInfo.from_manifest(rd.manifest, rd.path), out)
