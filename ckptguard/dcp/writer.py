"""``ckptguard.dcp.Writer``: a DCP ``StorageWriter`` whose save is a ckptguard checkpoint.

DCP drives the save in its own steps and collectives; each step is one of ckptguard's save
protocol (``saver``), so the checkpoint is committed exactly as ``ckptguard.save`` commits one:

    prepare_local_plan   (every rank)   its options, compared on the coordinator
    prepare_global_plan  (coordinator)  the layout (``layout``): a tensor id per key, the tree's
                                        shape; the staging directory (``target.Target.open``)
    write_data           (every rank)   its data file (``saver.write_data_file``): every chunk
                                        hashed, compressed as ``compress`` says, fsynced,
                                        checked; its report: file, index rows, its values
    finish               (coordinator)  every rank's report: index, manifest, one rename
                                        (``saver.commit_reports``, ``commit.publish``); LATEST

Nothing is visible under the name before ``finish`` renames the staging directory, after every
rank reported; a save that fails anywhere leaves the store as it was (its staging directory is
removed by the next save of this writer, or by ``ckptguard gc``). DCP pickles its own plans and
results between the ranks of the job; what ckptguard writes holds no pickle of its own
(``values``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .. import measure
from ..baseplan import link_plan
from ..errors import CheckpointError, UnsupportedObjectError, from_oserror, warn_after_commit
from ..failpoints import failpoint, set_rank
from ..format.layout import split_path
from ..format.manifest import CheckpointInfo
from ..hooks import run_commit_hooks
from ..keys import PrivateKey
from ..options import SaveOptions, check_options, shaping_options
from ..report import pack_report, unpack_report
from ..saver import Staged, commit_reports, write_data_file
from ..seal import Sealing
from ..sealplan import seal_plan
from ..sign import signer
from ..target import DIRECTORY
from ..tree import TORCH_DTYPES, TensorRef
from .layout import Layout, check_metadata, plan_layout
from .values import pickled_node, plain_node

OPTIONS = ("compress", "metadata", "overwrite", "step", "chunk_size", "timeout")
"""The options of ``ckptguard.save`` that a DCP save takes (``ckptguard.SaveOptions``)."""
REPORT = "$ckptguard/report"
"""The key of the write result that carries a rank's report to the coordinator."""


class Writer(StorageWriter):
    """Save through DCP as a ckptguard checkpoint ``<store>/<name>`` (``path``; or the
    ``checkpoint_id`` given to ``dcp.save``): atomic, every chunk hashed, compressed,
    ``ckptguard verify``-able, loadable by ``ckptguard.dcp.Reader`` (at any world size) and by
    ``ckptguard.load``. ``options``: ``compress``, ``metadata``, ``overwrite``, ``step``,
    ``chunk_size``, ``timeout``, as ``ckptguard.save`` takes them. After a save, ``info`` on the
    coordinator is the committed checkpoint's ``CheckpointInfo``. One save at a time per
    writer (``dcp.async_save``: wait for one before the next)."""

    def __init__(self, path: str | os.PathLike | None = None, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"ckptguard.dcp.Writer takes no option {', '.join(map(repr, unknown))}; its "
                f"options are {', '.join(OPTIONS)}"
            )
        self.opt = SaveOptions.from_kwargs(options)
        self.path = None if path is None else os.fspath(path)
        self.rank = 0
        self.info: CheckpointInfo | None = None
        self._layout: Layout | None = None
        self._staging: str | None = None  # the coordinator's save not (yet) committed
        self._uuid = ""
        self._signer: PrivateKey | None = None  # the coordinator's signing key (sign_key)
        self._base: dict | None = None  # an incremental save's base (``baseplan.link_plan``)
        self._seal: dict | None = None  # an encrypted save's keys (``sealplan.seal_plan``)
        self._clock = measure.Clock("dcp")  # from the global plan; DCP's caller's stall unknown

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def _target(self) -> tuple[str, str]:
        if self.path is None:
            raise ValueError(
                "ckptguard.dcp.Writer has no path: pass Writer(path) or dcp.save(..., "
                "checkpoint_id=path)"
            )
        return split_path(self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._target()
        if kwargs.get("use_collectives") is False:
            raise ValueError(
                "ckptguard.dcp.Writer commits once every rank has reported: it needs DCP's "
                "collectives (use_collectives=True)"
            )
        rank = kwargs.get("rank")
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = int(rank)
        set_rank(self.rank)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not plan.usable:
            raise ValueError(
                "ckptguard.dcp.Writer needs every rank's whole plan at each save: a planner "
                "with plan caching (enable_plan_caching=True) is not supported"
            )
        return dataclasses.replace(plan, storage_data=shaping_options(self.opt, *self._target()))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._discard()  # a save of this writer that did not commit
        self._clock = measure.Clock("dcp")
        check_options([p.storage_data for p in plans])
        layout = plan_layout(plans)
        store, name = self._target()
        self._signer = signer(self.opt.sign_key)  # the coordinator's key: before any file
        self._base = link_plan(store, self.opt.base, self.opt.max_depth)
        try:
            self._uuid, self._staging = DIRECTORY.open(store, name, self.opt.overwrite)
        except CheckpointError:  # before OSError: CheckpointExistsError is one too
            raise
        except OSError as e:
            raise from_oserror(e, store, "cannot create a staging directory in") from None
        try:  # the store exists now, and its keyring can be created
            self._seal = seal_plan(store, self.opt, (t["key"] for t in layout.tensors))
        except BaseException:
            self._discard()
            raise
        self._layout = layout
        digests = self.opt.digests or self._signer is not None  # a signature needs them
        common = {
            "uuid": self._uuid,
            "staging": self._staging,
            "digests": digests,
            "base": self._base,
            "seal": self._seal,
        }
        return [
            dataclasses.replace(p, storage_data={**common, "tensors": layout.rank_part(r)})
            for r, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        part = plan.storage_data
        todo: list[tuple[int, TensorRef]] = []
        values: dict[str, Any] = {}
        devices: dict[str, str] = {}
        for item in plan.items:
            f = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                values[f] = _value_node(item, planner)
                continue
            gid, key = part["tensors"][f]
            ref = _tensor_ref(key, item, planner.resolve_data(item))
            todo.append((gid, ref))
            devices[str(gid)] = ref.device
        opt = dataclasses.replace(self.opt, digests=part["digests"])
        seal = Sealing.from_plan(self.opt.encrypt or {}, part["seal"]) if part["seal"] else None
        doc, rows = write_data_file(
            DIRECTORY,
            part["staging"],
            part["uuid"],
            self.rank,
            opt,
            todo,
            base=part["base"],
            seal=seal,
        )
        report = pack_report({**doc, "values": values, "devices": devices}, rows)
        results = [WriteResult(item.index, _nbytes(item), None) for item in plan.items]
        results.append(WriteResult(MetadataIndex(REPORT), doc["file"]["size"], report))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        failpoint("dcp.reports_gathered")
        layout, staging = self._layout, self._staging
        if layout is None or staging is None:
            raise RuntimeError("ckptguard.dcp.Writer.finish without a planned save")
        try:
            check_metadata(layout, metadata.state_dict_metadata)
            reports = [_report(rs, r) for r, rs in enumerate(results)]
            values: dict[str, Any] = {}
            for doc, _ in reports:
                values.update(doc["values"])
                for gid, device in doc["devices"].items():
                    layout.tensors[int(gid)]["device"] = device
            tree = layout.tree(values)
            staged = Staged(
                self._uuid,
                staging,
                tree,
                {},
                layout.tensors,
                False,
                self._signer,
                self._base,
                self._seal,
            )
            store, name = self._target()
            info = commit_reports(DIRECTORY, store, name, len(results), self.opt, staged, reports)
        except BaseException as e:
            self._discard()
            with contextlib.suppress(Exception):  # the save's own error is what the caller gets
                measure.record_save_failure(*self._target(), e, self._clock)
            raise
        measure.record_save(store, info, self._clock, signed=self._signer is not None)
        self._staging, self._layout = None, None
        self.info = info
        for late in info.warnings:  # committed; what failed after the rename
            warn_after_commit(late, stacklevel=2)
        run_commit_hooks(info)

    def _discard(self) -> None:
        """Remove the staging directory of this writer's save that did not commit."""
        if self._staging is not None:
            with contextlib.suppress(OSError):  # else gc reclaims it; the store is unchanged
                DIRECTORY.discard(self._staging)
            self._staging = None


def _standard(planner: SavePlanner) -> bool:
    """Whether ``planner`` writes a value as DCP's default planner does: ``torch.save`` of the
    object its ``lookup_object`` returns (so that object may be stored instead)."""
    if not isinstance(planner, DefaultSavePlanner):
        return False
    cls = type(planner)
    return (
        cls.resolve_data is DefaultSavePlanner.resolve_data
        and cls.transform_object is DefaultSavePlanner.transform_object
    )


def _value_node(item: WriteItem, planner: SavePlanner) -> Any:
    """The tree node of a non-tensor value: the value itself when it is plain, else the bytes
    the planner made of it (``values``)."""
    if _standard(planner):
        plain, node = plain_node(planner.lookup_object(item.index))  # type: ignore[attr-defined]
        if plain:
            return node
    data = planner.resolve_data(item)
    if isinstance(data, io.BytesIO):
        return pickled_node(data.getvalue())
    if isinstance(data, (bytes, bytearray)):
        return pickled_node(bytes(data))
    raise UnsupportedObjectError(
        f"DCP's planner gave {type(data).__name__} for the bytes item {item.index.fqn!r}",
        item.index.fqn,
    )


def _tensor_ref(key: str, item: WriteItem, t: Any) -> TensorRef:
    """The ref the data file writer takes for one DCP chunk: a shard of the key's tensor."""
    f, td = item.index.fqn, item.tensor_data
    if not isinstance(t, torch.Tensor) or td is None:
        raise UnsupportedObjectError(
            f"DCP's planner gave {type(t).__name__} for the tensor item {f!r}", f
        )
    dtype = TORCH_DTYPES.get(t.dtype)
    ok = t.layout == torch.strided and not t.is_meta and not t.is_quantized
    if dtype is None or not ok or list(t.shape) != list(td.chunk.sizes):
        raise UnsupportedObjectError(
            f"tensor {f!r}: DCP's planner gave {t.dtype}{list(t.shape)} ({t.layout}) for a "
            f"chunk of {list(td.chunk.sizes)}; ckptguard stores strided tensors of its dtypes",
            f,
        )
    shape = tuple(int(n) for n in t.shape)
    return TensorRef(
        key,
        dtype,
        shape,
        "torch",
        str(t.device),
        False,
        False,
        t.detach(),
        tuple(int(n) for n in td.size),
        tuple(int(n) for n in td.chunk.offsets),
        sharded=True,
        unique_box=True,
    )


def _nbytes(item: WriteItem) -> int:
    return item.tensor_storage_size() or 0


def _report(results: list[WriteResult], rank: int) -> tuple[dict, Any]:
    """Rank ``rank``'s report among its write results."""
    for wr in results:
        if wr.index.fqn == REPORT:
            return unpack_report(wr.storage_data)
    raise RuntimeError(f"rank {rank} sent DCP no ckptguard report (another StorageWriter?)")
