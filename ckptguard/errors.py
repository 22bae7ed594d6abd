"""The typed errors of ckptguard: one base class, a few kinds a caller can act on."""

from __future__ import annotations

import warnings


def location(file: str | None, key: str | None, chunk: int | None, offset: int | None) -> str:
    """`` [file=..., tensor=..., chunk=..., offset=...]`` for the parts that are known."""
    where = [
        f"{n}={v}"
        for n, v in (("file", file), ("tensor", key), ("chunk", chunk), ("offset", offset))
        if v is not None
    ]
    return f" [{', '.join(where)}]" if where else ""


def brief(e: BaseException) -> str:
    """``Type: reason`` of an exception, for messages that report it without raising it."""
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


class CheckpointError(Exception):
    """Base class of every error ckptguard raises on purpose."""


class CheckpointWarning(UserWarning):
    """The operation took effect, but a step after its commit point failed.

    E.g. a save is committed but LATEST could not be moved, or a deleted checkpoint's files are
    left in ``.staging/`` for ``gc``. The message says what did not happen. An error here would
    misreport the store: the operation cannot be undone at that point.
    """


def warn_after_commit(message: str, stacklevel: int = 1) -> None:
    """Report ``message``, a step that failed after an operation's commit point, as a
    CheckpointWarning (the operation stands). ``stacklevel`` counts from the caller, as
    ``warnings.warn``'s does."""
    warnings.warn(CheckpointWarning(message), stacklevel=stacklevel + 1)


class ReplicaMismatchWarning(UserWarning):
    """A save with ``check_replicated=False`` found copies of a replicated tensor that differ
    between ranks: the lowest rank's copy is saved, and every rank loads that copy. Values that
    are each rank's own (an RNG state) belong in ``ckptguard.PerRank``."""


class WorldSizeError(CheckpointError, ValueError):
    """The checkpoint holds per-rank tensors (``PerRank``) of a different number of ranks than
    the job loading it: pass ``rank=`` to ``load`` to choose whose values to load."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the given path (or the store has no LATEST)."""


class ValidationFailedError(CheckpointNotFoundError):
    """A load that skips checkpoints marked as failing validation
    (``skip_failed_validation=True``) found none left: ``names`` are the store's checkpoints it
    skipped, newest first."""

    def __init__(self, message: str, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.names = names


class CheckpointHeldError(CheckpointError):
    """The checkpoint is under a legal hold (``Store.hold``, ``ckptguard hold``): it is not
    deleted, pruned or overwritten until the hold is released. ``name`` and ``reason`` say which
    hold; a hold marker that cannot be read counts as a hold (fail closed)."""

    def __init__(self, message: str, name: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.name, self.reason = name, reason


class KeyUnavailableError(CheckpointError):
    """An encrypted chunk's data key cannot be had: the store's keyring has no key for its scope,
    the key-encryption key (KEK) is not configured or is not the one the key is wrapped under,
    or the keyring entry is damaged. ``scope`` names the encryption scope, ``key_id`` the data
    key. Nothing is decrypted with a wrong key: a load fails with this error, never with
    garbage."""

    def __init__(self, message: str, scope: str = "", key_id: str = "") -> None:
        super().__init__(message)
        self.scope, self.key_id = scope, key_id


class ScopeShreddedError(KeyUnavailableError):
    """The scope's data key was destroyed (``ckptguard shred``): every chunk encrypted under it
    is unreadable for good, by design. Chunks of other scopes still load."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already has that name and overwrite was not requested."""


class DrainConflictError(CheckpointExistsError):
    """DST already has a checkpoint of that name with another uuid (a different checkpoint)."""

    def __init__(
        self,
        name: str,
        src_path: str,
        src_uuid: str,
        dst_path: str,
        dst_uuid: str,
        more: int = 0,
        replaceable: bool = True,
        fix: str | None = None,
    ) -> None:
        also = f" (and {more} more conflicting name(s))" if more else ""
        fix = fix or (
            "pass overwrite=True (--overwrite) to replace the one in the destination"
            if replaceable
            else "a checkpoint in an object store is never replaced"
        )
        super().__init__(
            f"checkpoint {name!r} differs between the stores: {src_path} has uuid {src_uuid}, "
            f"{dst_path} has uuid {dst_uuid}{also}; {fix}"
        )
        self.name = name
        self.src_path = src_path
        self.src_uuid = src_uuid
        self.dst_path = dst_path
        self.dst_uuid = dst_uuid


class NotACheckpointError(CheckpointError):
    """Something other than a committed checkpoint is at the name a save would use (a directory
    without a valid MANIFEST.json, a file, a link): a save never replaces it, even with overwrite.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class OneFileError(CheckpointError, ValueError):
    """A one-file save (a path with a file suffix, ``one_file=True`` or a file object) was asked
    of a job of several ranks: one file holds one process's state. Nothing is written. Save
    from one rank (``if rank == 0``) without a coordinator, or a directory checkpoint of every
    rank with ``one_file=False``. ``option`` names the option that decides it."""

    option = "one_file"


class InvalidNameError(CheckpointError, ValueError):
    """A checkpoint name that the format does not allow (e.g. containing '/' or '..')."""


class UnsupportedObjectError(CheckpointError, TypeError):
    """A value in the saved state that cannot be stored without pickle."""

    def __init__(self, message: str, key_path: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path


class RegisteredTypeError(CheckpointError, TypeError):
    """A stored dataclass, enum member or named tuple that this process cannot rebuild: its
    class is not registered (``ckptguard.register_types``) or no longer matches what was saved."""

    def __init__(self, message: str, key_path: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path
        self.type_name = type_name


class FormatVersionError(CheckpointError):
    """The checkpoint needs a newer reader (format version or required feature)."""


class ForeignCheckpointError(CheckpointError):
    """A torch.save file, safetensors file or set, or DCP directory where a ckptguard checkpoint
    was expected: it has no ckptguard hashes, so there is nothing to verify it against.
    ``ckptguard import`` (``ckptguard.import_checkpoint``) makes a verified checkpoint of it."""

    def __init__(self, message: str, path: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.kind = kind


class ForeignFormatError(CheckpointError):
    """A file of another format (torch.save, safetensors, DCP) that cannot be read: truncated or
    damaged bytes, a header pointing outside its file, a special file or link where a regular
    file must be. ``path`` names the file, ``kind`` the format it was read as."""

    def __init__(self, message: str, path: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.kind = kind


class UnsafePickleError(ForeignFormatError):
    """A pickle in a file of another format needs a global (``global_name``: a class or function)
    that the weights-only unpickler does not allow. ``allow_pickle=True`` (``--allow-pickle``)
    reads it with full pickle, which can run arbitrary code: only for files you trust."""

    def __init__(self, message: str, path: str = "", kind: str = "", global_name: str = "") -> None:
        super().__init__(message, path, kind)
        self.global_name = global_name


class StoreError(CheckpointError):
    """The store cannot be used: missing, read-only, full, or an I/O error."""

    def __init__(self, message: str, path: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class StoreFullError(StoreError):
    """The file system ran out of space (ENOSPC) or quota during a save."""


class StoreNotWritableError(StoreError):
    """The store is read-only or permission was denied."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match what its manifest, index or hashes promise."""

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        file: str | None = None,
        key: str | None = None,
        chunk: int | None = None,
        offset: int | None = None,
    ) -> None:
        full = message + location(file, key, chunk, offset)
        if path:
            full += f" in {path}"
        super().__init__(full)
        self.reason = message
        self.path = path
        self.file = file
        self.key = key
        self.chunk = chunk
        self.offset = offset


class ExportError(CheckpointError, ValueError):
    """A checkpoint cannot be exported as asked: an unknown format, a subtree that is not there,
    names that collide once joined, a value the format cannot hold under ``strict``, or files
    in the destination that would be replaced without ``force``. ``path`` names the checkpoint
    or the file concerned."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ExportWarning(UserWarning):
    """An export left values out that its format cannot hold (non-tensor values, dtypes it has
    no type for); the message names them, ``ExportResult.left_out`` lists them."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced (an overwrite of its name) or removed while it was being
    read. Not damage: its files went away with the directory; read the name again."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class HostPoolTooSmallError(CheckpointError, ValueError):
    """The state's tensors need more host memory than the pool may hold (``max_host_bytes``)."""

    def __init__(self, message: str, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


class HostPoolPrepareError(CheckpointError):
    """The host pool could not be allocated ahead of the saves (``Checkpointer(prepare=...)``):
    out of memory, a resource limit, pinned memory refused; ``__cause__`` is the allocation's
    error. Saves are unaffected: each allocates what it needs, as without a preparation."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes


class HostPoolPrepareWarning(RuntimeWarning):
    """A ``Checkpointer``'s host pool could not be prepared (``HostPoolPrepareError`` says why):
    its saves allocate the pool as they need it, in the first save's stall."""


class OutOfMemoryError(CheckpointError, MemoryError):
    """A load could not allocate the memory for a tensor (host RAM, pinned or device memory).

    ``key`` names the tensor, ``nbytes`` the bytes it needed, ``where`` the kind of memory.
    """

    def __init__(self, message: str, key: str, nbytes: int, where: str) -> None:
        super().__init__(message)
        self.key = key
        self.nbytes = nbytes
        self.where = where


class CaptureCancelledError(CheckpointError):
    """The pool was closed while a capture waited for a free region."""


class CheckpointerClosedError(CheckpointError, RuntimeError):
    """The Checkpointer was closed; it takes no more saves or loads."""


class SaveCancelledError(CheckpointError):
    """The save was cancelled by ``close(cancel=True)`` before it was persisted."""


def from_oserror(e: OSError, path: str, action: str) -> StoreError:
    """Turn an OSError from the store into the typed error a user can act on."""
    import errno as _errno

    msg = f"{action} {path}: {e.strerror or e}"
    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return StoreFullError(f"{msg} (free space or raise the quota)", path, e.errno)
    if e.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        reading = action.startswith(("cannot read", "cannot open", "cannot list", "cannot stat"))
        hint = "check its owner and mode" if reading else "the store is not writable"
        return StoreNotWritableError(f"{msg} ({hint})", path, e.errno)
    return StoreError(msg, path, e.errno)


class CheckpointAbortedError(CheckpointError):
    """A distributed save was abandoned: a rank failed, died or stalled. Every rank raises it."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class OptionsMismatchError(CheckpointAbortedError, ValueError):
    """The ranks of one save passed different values for an option that shapes the checkpoint
    (its path, overwrite, compress, chunk_size, ...). Nothing is written; every rank raises it.

    ``option`` names the first differing option, ``values`` maps each rank to its value.
    """

    def __init__(self, message: str, option: str = "", values: dict | None = None) -> None:
        super().__init__(message)
        self.option = option
        self.values = values or {}


class CoordinationTimeoutError(CheckpointAbortedError):
    """Ranks did not all reach a collective step of the save before the deadline."""


class AgentError(CheckpointError):
    """``ckptguard run`` could not set up its agents (MPI, control socket, job information)."""


class RetentionPolicyError(CheckpointError, ValueError):
    """A retention policy that cannot be used (an unknown rule, a bad count or duration, an
    unreadable policy file, or no rule at all where pruning needs one). Nothing is deleted."""


class AdviceError(CheckpointError, ValueError):
    """``ckptguard advise`` lacks a figure it needs and cannot derive it from the store's
    events (no save recorded for the checkpoint cost, no interruption for the mean time
    between failures), or was given one that cannot be used (a negative or zero cost). The
    message names the figure and the option that supplies it."""


class IntegrationError(CheckpointError, ValueError):
    """A framework integration (``ckptguard.lightning``, ``ckptguard.hf``) cannot do what it was
    asked: a path it cannot write atomically (a remote URL, a directory where a file belongs),
    or a framework whose internals differ from those the integration was built against (the
    message names the method and the version found)."""


class LineageError(CheckpointError):
    """The MLflow run that ``save(..., mlflow_run=...)`` is to record cannot be read (no active
    run, an unknown run id, a tracking server that does not answer, or MLflow not installed).
    Raised on the committing rank before any file is written."""


class KeyFileError(CheckpointError, ValueError):
    """A key file that cannot be used: missing, a link, a FIFO or other special file, a private
    key readable by its group or others, the wrong size or not a key at all. Nothing is read
    from it (or written, for a key about to be created). ``path`` names the file."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class SignatureError(CheckpointError):
    """A signature that does not verify, or one made by a key that is not the trusted one:
    what it covers may have been changed by someone. ``path`` names what was signed."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class AuditError(CheckpointError):
    """A store's audit log (``STORE/.audit``) cannot be used or does not verify. ``path`` names
    the file, ``entry`` the 0-based entry (or tree size) where the problem was found, when one
    is known."""

    def __init__(self, message: str, path: str = "", entry: int | None = None) -> None:
        where = f" [entry {entry}]" if entry is not None else ""
        super().__init__(f"{message}{where}" + (f" in {path}" if path else ""))
        self.reason = message
        self.path = path
        self.entry = entry


class AuditTamperedError(AuditError):
    """The audit log is not the one its tree heads describe: an entry edited, removed,
    inserted or reordered, a torn or malformed line, a head that contradicts another."""


class AuditRollbackError(AuditTamperedError):
    """The audit log is shorter than, or diverges from, a tree head held elsewhere (the witness,
    or one the user passed): the store was rolled back or its log rewritten."""


class AuditSignatureError(AuditTamperedError, SignatureError):
    """A tree head whose signature does not verify, or one signed by another key than the
    trusted one."""

    def __init__(self, message: str, path: str = "", entry: int | None = None) -> None:
        AuditError.__init__(self, message, path, entry)


class AuditLockTimeoutError(AuditError):
    """The audit log's lock was not granted within the bounded wait: another writer holds it
    (or a dead NFS client's lock was not yet recovered). Nothing was appended."""


class RedundancyError(CheckpointError, ValueError):
    """Node-local redundancy that cannot be set up or used as asked: too few nodes for the
    scheme, a host or failure domain that is not a plain name, or parity data that does not
    belong to the set or checkpoint it is used for. The message names what was wrong."""


class RebuildError(RedundancyError):
    """Lost files that cannot be rebuilt: more members of a set are missing than its scheme
    survives, or a survivor's copy or parity is damaged. Load the newest drained checkpoint."""


class MlflowStoreError(CheckpointError):
    """An MLflow tracking server's backend store cannot be snapshot: a URI of an unsupported
    kind or form, a database that cannot be reached or is not MLflow's (no ``alembic_version``),
    or a copy or dump that failed. The message names the store (never its password) and the
    cause; a failed snapshot leaves no database file in the destination."""


class ArtifactReferenceError(CheckpointError, ValueError):
    """An artifact URI of an MLflow store that does not name a path inside the given artifact
    roots: another scheme (s3, gs, http), a relative path, a ``..`` step, a path (or a link)
    leading outside every root, or an indirect URI (``runs:/``, ``models:/``) whose target is not
    in the snapshot. ``uri`` is the URI."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class MlflowBackupError(CheckpointError):
    """An MLflow backup that cannot be made: an artifact that cannot be read or changed size
    while it was read, or more bytes than ``max_memory`` allows. Nothing is committed; the
    previous backup is untouched. The message names the file."""


class MlflowRestoreError(CheckpointError):
    """An MLflow backup that cannot be restored: not a backup of this layout (a path that is not
    plain and relative, a value of the wrong type), a target that is not fresh (an existing
    database file, a database with tables, an artifact root that is not empty), a backup of
    another kind of store, or a ``pg_restore`` that failed. What the restore wrote is removed."""
